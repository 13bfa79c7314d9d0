"""A method built from a config: the registered method class around the registered backbone."""

from __future__ import annotations

from dataclasses import replace

import torch

from selfsup.config import Config
from selfsup.core.method import Method


def build_method(cfg: Config) -> Method:
    from selfsup.backbones import build_backbone
    from selfsup.registry import get_method

    method_cls = get_method(cfg.method.name)
    torch.manual_seed(cfg.trainer.seed)  # same seed -> same init, also for the random-init baseline
    backbone_cfg = cfg.backbone
    if backbone_cfg.img_size is None and backbone_cfg.name.startswith(("timm:", "vit_")):
        backbone_cfg = replace(backbone_cfg, img_size=cfg.augment.views[0].size)  # ViTs: the global crop side
    return method_cls(cfg.method, build_backbone(backbone_cfg), cfg.augment)
