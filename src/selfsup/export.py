"""Export a pretrained encoder's weights as safetensors, named as torchvision/timm name them.

Load back with the library that defined the architecture, e.g. for a ResNet-18:

    >>> import torchvision, torch.nn as nn
    >>> from safetensors.torch import load_file
    >>> m = torchvision.models.resnet18(); m.fc = nn.Identity()
    >>> m.load_state_dict(load_file("encoder.safetensors"))

(with ``backbone.cifar_stem: true`` also set ``m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)``
and ``m.maxpool = nn.Identity()`` first), or ``load_encoder("encoder.safetensors")``, which reads
the architecture from the file's metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from selfsup.config import BackboneConfig
from selfsup.errors import CheckpointError, ExportError


def export_encoder(checkpoint: str | Path, out: str | Path) -> dict:
    """Write the backbone of ``checkpoint`` to ``out`` (atomically); returns the metadata."""
    from selfsup.evaluate import load_method

    method, cfg, path = load_method(checkpoint)
    encoder = method.export_backbone()  # the one encode() reads (I-JEPA: context or EMA target)
    tensors = encoder.export_state_dict()
    backbone = cfg.to_dict()["backbone"]
    built_size = getattr(getattr(encoder.model, "patch_embed", None), "img_size", None)
    if backbone.get("img_size") is None and built_size is not None:
        backbone["img_size"] = int(built_size[0])  # ViTs: the side it was built for (default: the crop's)
    meta = {
        "format": "selfsup-encoder/1",
        "library": encoder.family,
        "backbone": json.dumps(backbone),
        "method": cfg.method.name,
        "out_dim": str(encoder.out_dim),
        "source_checkpoint": str(path),
    }
    note = method.export_note()
    if note:
        meta["note"] = note
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as err:  # unwritable folder, full disk: no half-written file
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ExportError(f"could not write {out}: {err}") from None
    return {**meta, "tensors": len(tensors), "path": str(out)}


def load_encoder(path: str | Path) -> torch.nn.Module:
    """Rebuild the exported encoder (a torchvision/timm module) and load its weights."""
    from selfsup.backbones import build_backbone
    from selfsup.config import from_dict

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    if meta.get("format") != "selfsup-encoder/1":
        raise CheckpointError(f"{path} was not written by `selfsup export` (no selfsup metadata)")
    cfg = from_dict(BackboneConfig, json.loads(meta["backbone"]), "backbone")
    model = build_backbone(cfg).model
    model.load_state_dict(state)
    return model.eval()
