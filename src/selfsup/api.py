"""The Python API: build a method by name or recipe, load a run or an export.

    >>> import selfsup
    >>> model = selfsup.create("mae", backbone="vit_tiny", mask_ratio=0.75)
    >>> loss, metrics = model({"images": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)})
    >>> features = model.encode(x)          # what kNN, probes and export read
    >>> model = selfsup.load("runs/mae-20261201-120000")   # a run, a .ckpt, or an exported .safetensors
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml

from selfsup.config import Config, load_config
from selfsup.errors import ConfigError

SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _override_text(key: str, value: Any) -> str:
    """``key=value`` in the command line's override syntax (YAML flow style for the value)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    text = yaml.safe_dump(plain(value), default_flow_style=True, width=2**20).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _overrides(backbone: str | None, kwargs: dict[str, Any]) -> list[str]:
    """Keyword arguments as overrides: a section name with a mapping (``optim={"lr": 0.1}``), a
    dotted key through ``**{"optim.lr": 0.1}``, or any other name as a method hyperparameter
    (``mask_ratio=0.6`` is ``method.mask_ratio=0.6``)."""
    out = [_override_text("backbone.name", backbone)] if backbone is not None else []
    for key, value in kwargs.items():
        if key in SECTIONS and isinstance(value, dict):
            out += [_override_text(f"{key}.{k}", v) for k, v in value.items()]
        elif key in SECTIONS and key != "method":
            raise ConfigError(f"{key}= takes a mapping of that section's keys, e.g. {key}={{...}}")
        else:
            out.append(_override_text(key if "." in key else f"method.{key}", value))
    return out


def create(method: str | Path | Config, backbone: str | None = None, **overrides: Any) -> torch.nn.Module:
    """A method ready to train: ``forward(batch)`` gives ``loss, metrics``, ``encode(x)`` features.

    ``method``: a registered name (``"simclr"``, ``"mae"``: the paper's defaults), a recipe file
    (``"configs/dino/cifar10.yaml"``) or a :class:`~selfsup.config.Config`. ``backbone`` names the
    encoder (``"resnet50"``, ``"vit_small"``, ``"timm:convnext_tiny"``); other keyword arguments
    override the config (see ``_overrides``). The full config is ``model.run_config``; pass it to
    :class:`~selfsup.train.trainer.Trainer` to train this recipe."""
    from selfsup.core.build import build_method

    if isinstance(method, Config):
        if backbone is not None or overrides:
            raise ConfigError("create(Config) takes no overrides; use dataclasses.replace on the config")
        cfg = method
    else:
        text = str(method)
        is_recipe = text.endswith((".yaml", ".yml")) or Path(text).is_file()
        extra = _overrides(backbone, overrides)
        cfg = load_config(text, extra) if is_recipe else load_config(None, [f"method.name={text}", *extra])
    model = build_method(cfg)
    model.run_config = cfg
    return model


def load(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A trained model from a run directory or a ``.ckpt`` (the whole method, in eval mode, with
    ``run_config``), or the encoder alone from a ``selfsup export`` ``.safetensors`` file (the
    torchvision / timm module)."""
    if Path(path).suffix == ".safetensors":
        from selfsup.export import load_encoder

        return load_encoder(path).to(device).eval()
    from selfsup.evaluate import load_method

    model, cfg, _ = load_method(path, device)
    model.run_config = cfg
    return model
