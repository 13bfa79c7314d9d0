"""Encoders. Every backbone maps a normalized image batch to pooled features ``(B, out_dim)``
and can hand back its weights under the names of the library it came from (torchvision or
timm), so an exported encoder loads into ``torchvision.models.resnet18()`` or
``timm.create_model(...)`` without renaming.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from selfsup.config import BackboneConfig
from selfsup.errors import ConfigError
from selfsup.registry import get_backbone_builder, register_backbone


class Backbone(nn.Module):
    """Wraps a third-party encoder as ``self.model``; ``out_dim`` is the pooled feature size."""

    out_dim: int
    # selfsup.export.load_encoder returns the backbone itself rather than its inner model: encoders whose
    # forward does more than the inner model (the audio ViT computes its spectrogram first)
    loads_whole: bool = False

    def __init__(self, model: nn.Module, out_dim: int, family: str) -> None:
        super().__init__()
        self.model = model
        self.out_dim = out_dim
        self.family = family  # "torchvision" or "timm": whose names export_state_dict uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features before pooling, in timm's sense: a convnet's last feature map (B, C, h, w); a
        token model's normed tokens (B, T, D) (``ViT`` overrides this). Probes and masked
        methods read these."""
        if self.family == "timm":
            return self.model.forward_features(x)
        m = self.model  # torchvision ResNet: the stem and the four stages, without the pooling
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights named as the source library names them (no ``model.`` prefix)."""
        return {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}


def _resnet(arch: str, cfg: BackboneConfig) -> Backbone:
    model = getattr(torchvision.models, arch)(weights=None, zero_init_residual=cfg.zero_init_residual)
    if cfg.width != 64:
        _set_width(model, cfg.width, cfg.zero_init_residual)
    if cfg.cifar_stem:
        # CIFAR variant (SimCLR appendix B.9): 3x3 stride-1 stem, no max-pool, keeps 32x32 detail
        model.conv1 = nn.Conv2d(3, cfg.width, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    out_dim = model.fc.in_features
    model.fc = nn.Identity()
    return Backbone(model, out_dim, "torchvision")


def _set_width(model: torchvision.models.ResNet, width: int, zero_init_residual: bool = False) -> None:
    """Rebuild a torchvision ResNet's stem and stages with ``width`` channels in the first stage
    (doubling per stage), with torchvision's own blocks: parameter names stay torchvision's, so
    the weights load into the same rebuilt model. Narrow CIFAR-stem ResNets keep the 32x32
    resolution that a stride-4 stem throws away at about the same CPU cost."""
    block = type(model.layer1[0])
    depths = [len(model.layer1), len(model.layer2), len(model.layer3), len(model.layer4)]
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.layer1 = model._make_layer(block, width, depths[0])
    model.layer2 = model._make_layer(block, width * 2, depths[1], stride=2)
    model.layer3 = model._make_layer(block, width * 4, depths[2], stride=2)
    model.layer4 = model._make_layer(block, width * 8, depths[3], stride=2)
    model.fc = nn.Linear(width * 8 * block.expansion, 1000)
    for m in model.modules():  # torchvision's init for the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        last_bn = getattr(m, "bn3", None) or getattr(m, "bn2", None) if hasattr(m, "downsample") else None
        if zero_init_residual and last_bn is not None:
            nn.init.zeros_(last_bn.weight)


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register_backbone(_arch, modality="image")(lambda cfg, _a=_arch: _resnet(_a, cfg))


@register_backbone("timm", modality="image")
def _timm(cfg: BackboneConfig) -> Backbone:
    import timm

    name = cfg.name.split(":", 1)[1]
    kwargs: dict = {"pretrained": False, "num_classes": 0}
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    try:
        model = timm.create_model(name, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"backbone {cfg.name!r}: timm could not build it: {err}") from None
    return Backbone(model, model.num_features, "timm")


def build_backbone(cfg: BackboneConfig) -> Backbone:
    return get_backbone_builder(cfg.name)(cfg)


# registers vit_tiny / vit_small / vit_base / vit_large (imported last: vit.py subclasses Backbone)
from selfsup.backbones.vit import ViT, sincos_2d_pos_embed  # noqa: E402
from selfsup.backbones.text import TextEncoder  # noqa: E402  (text_tiny ... text_base)
from selfsup.backbones.series import PatchTST  # noqa: E402  (patchtst)
from selfsup.backbones.audio import AudioViT  # noqa: E402  (audio_vit_tiny ... audio_vit_base)
from selfsup.backbones.video import VideoViT  # noqa: E402  (video_vit_tiny ... video_vit_large)

__all__ = ["AudioViT", "Backbone", "PatchTST", "TextEncoder", "VideoViT", "ViT", "build_backbone", "sincos_2d_pos_embed"]
