"""A method built from a config: the registered method class around the registered backbone."""

from __future__ import annotations

from dataclasses import replace

import torch

from selfsup.config import Config
from selfsup.core.method import Method


def resolve_config(cfg: Config) -> Config:
    """``cfg`` with the settings its modality fixes from the data before the encoder is built
    (text: the tokenizer, so the vocabulary size); a config that has them is returned as it is."""
    from selfsup.registry import get_modality, run_modality

    modality = get_modality(run_modality(cfg.method.name, cfg.backbone.name, cfg.data.source))
    return modality.configure(cfg) if modality.configure is not None else cfg


def build_method(cfg: Config) -> Method:
    from selfsup.backbones import build_backbone
    from selfsup.registry import get_method

    cfg = resolve_config(cfg)
    method_cls = get_method(cfg.method.name)
    torch.manual_seed(cfg.trainer.seed)  # same seed -> same init, also for the random-init baseline
    backbone_cfg = cfg.backbone
    if backbone_cfg.img_size is None and backbone_cfg.name.startswith(("timm:", "vit_")):
        backbone_cfg = replace(backbone_cfg, img_size=cfg.augment.views[0].size)  # ViTs: the global crop side
    return method_cls(cfg.method, build_backbone(backbone_cfg), cfg.augment)
