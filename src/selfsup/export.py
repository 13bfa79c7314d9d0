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
    """Write the backbone of ``checkpoint`` to ``out`` (atomically); returns the metadata. A text
    encoder is written as a folder (``export_text_encoder``)."""
    from selfsup.backbones.text import TextEncoder
    from selfsup.evaluate import load_method

    method, cfg, path = load_method(checkpoint)
    encoder = method.export_backbone()  # the one encode() reads (I-JEPA: context or EMA target)
    if isinstance(encoder, TextEncoder):
        return export_text_encoder(method, cfg, path, out)
    if Path(out).suffix != ".safetensors" and getattr(encoder, "family", "") == "selfsup" and hasattr(encoder, "num_frames"):
        return export_video_transformers(method, cfg, path, out)
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


def _write_safetensors(tensors: dict, out: Path, meta: dict) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ExportError(f"could not write {out}: {err}") from None


@contextlib.contextmanager
def _atomic_folder(out: Path):
    """Yield a hidden sibling folder to fill, then rename it to ``out`` (which must be absent or an empty folder):
    an interrupted export leaves no half folder, and a failure is one ExportError."""
    import shutil

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder; give a new folder for the export")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"could not write {out}: {err}") from None


def export_video_transformers(method, cfg, path: Path, out: str | Path) -> dict:
    """A video encoder as a folder ``out`` that ``transformers.AutoModel.from_pretrained(out)`` loads as V-JEPA 2
    (``VJEPA2Model``; the architecture of ``backbone.pos_embed: rope``): ``model.safetensors``, ``config.json`` and
    ``selfsup.json``. Encoders of another architecture are refused with why (export them to a ``.safetensors``
    file for ``load_encoder``). Written into a hidden sibling folder, then renamed."""

    from selfsup.backbones.video import hf_export
    from selfsup.checkpoint import write_text_atomic

    encoder = method.export_backbone()
    out = Path(out)
    mapped = hf_export(encoder)
    if isinstance(mapped, str):
        raise ExportError(f"{mapped}: give a .safetensors file to export it under selfsup's names "
                          "(selfsup.export.load_encoder)")
    tensors, hf_config = mapped
    meta = {"format": "selfsup-encoder/1", "library": "transformers", "backbone": json.dumps(cfg.to_dict()["backbone"]),
            "method": cfg.method.name, "out_dim": str(encoder.out_dim), "source_checkpoint": str(path),
            "note": ("load with transformers.AutoModel.from_pretrained(folder) (VJEPA2Model); tokens: "
                     "model(pixel_values_videos=clips (B, T, 3, H, W), skip_predictor=True).last_hidden_state, the "
                     "feature selfsup's encode reads is their mean; " + method.export_note())}
    with _atomic_folder(out) as tmp:
        write_text_atomic(tmp / "config.json", json.dumps(hf_config, indent=2))
        _write_safetensors(tensors, tmp / "model.safetensors", meta)
        write_text_atomic(tmp / "selfsup.json", json.dumps(meta, indent=2))
    return {**meta, "tensors": len(tensors), "path": str(out)}


def export_text_encoder(method, cfg, path: Path, out: str | Path) -> dict:
    """A text encoder as a folder ``out``: ``model.safetensors`` and ``config.json`` under Hugging Face
    ``transformers`` names where an architecture computes the same function (``GPT2Model`` for a
    causal pre-LN encoder, ``BertModel`` for a post-LN one; ``AutoModel.from_pretrained(out)`` loads
    it), else selfsup's own names (``load_encoder(out)``); ``tokenizer.json`` (+ its
    ``tokenizer_config.json``) always; ``selfsup.json``, what selfsup needs to rebuild it.

    Written into a hidden sibling folder, then renamed: an interrupted export leaves no half folder."""

    from selfsup.backbones.text import hf_export
    from selfsup.checkpoint import write_text_atomic

    encoder = method.export_backbone()
    out = Path(out)
    if out.suffix == ".safetensors":
        raise ExportError(f"a text encoder exports as a folder (weights, config.json, tokenizer.json); give a "
                          f"folder path instead of {out}")
    mapped = hf_export(encoder, causal=method.causal)
    backbone = cfg.to_dict()["backbone"]
    meta = {"format": "selfsup-encoder/1", "library": "transformers" if not isinstance(mapped, str) else "selfsup",
            "backbone": json.dumps(backbone), "method": cfg.method.name, "out_dim": str(encoder.out_dim),
            "source_checkpoint": str(path), "causal": str(method.causal)}
    note = ("load with transformers.AutoModel.from_pretrained(folder) and AutoTokenizer; "
            f"features: {'the mean of the hidden states over real tokens' if encoder.pool == 'mean' else 'the first token'}"
            if not isinstance(mapped, str) else
            f"no transformers architecture: {mapped}; load with selfsup.export.load_encoder(folder)")
    meta["note"] = note
    with _atomic_folder(out) as tmp:
        if isinstance(mapped, str):
            tensors = {k: v.detach().float().contiguous().clone() for k, v in encoder.model.state_dict().items()}
        else:
            tensors, hf_config = mapped
            write_text_atomic(tmp / "config.json", json.dumps(hf_config, indent=2))
        _write_safetensors(tensors, tmp / "model.safetensors", meta)
        tok = encoder.tokenizer
        if tok is not None:
            tok.save(tmp / "tokenizer.json")
            special = {"pad_token": tok.token(tok.pad_id) if tok.has("pad") else None,
                       "unk_token": tok.token(tok._ids["unk"]) if tok.has("unk") else None,
                       "mask_token": tok.token(tok.mask_id) if tok.has("mask") else None,
                       "sep_token": tok.token(tok.sep_id) if tok.has("sep") else None,
                       "cls_token": tok.token(tok.cls_id) if tok.has("cls") else None}
            write_text_atomic(tmp / "tokenizer_config.json", json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": encoder.max_len,
                 **{k: v for k, v in special.items() if v is not None}}, indent=2))
        write_text_atomic(tmp / "selfsup.json", json.dumps({k: v for k, v in meta.items()}, indent=2))
    return {**meta, "tensors": len(tensors), "path": str(out)}


def load_encoder(path: str | Path) -> torch.nn.Module:
    """Rebuild the exported encoder and load its weights: the torchvision / timm module itself, or for
    selfsup's own encoders (time series) and the encoders with a front end (audio: the spectrogram) the
    selfsup backbone, whose ``forward`` is the pooled feature of the raw input."""
    from selfsup.backbones import build_backbone
    from selfsup.config import from_dict

    if Path(path).is_dir():  # a text encoder's folder
        meta = json.loads((Path(path) / "selfsup.json").read_text()) if (Path(path) / "selfsup.json").is_file() else {}
        if meta.get("library") != "selfsup":
            raise CheckpointError(f"{path} holds transformers weights: load it with "
                                  "transformers.AutoModel.from_pretrained(folder)")
        return _load_text_encoder(Path(path), meta)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    if meta.get("format") != "selfsup-encoder/1":
        raise CheckpointError(f"{path} was not written by `selfsup export` (no selfsup metadata)")
    cfg = from_dict(BackboneConfig, json.loads(meta["backbone"]), "backbone")
    backbone = build_backbone(cfg)
    backbone.model.load_state_dict(state)
    return (backbone if backbone.family == "selfsup" or backbone.loads_whole else backbone.model).eval()


def _load_text_encoder(folder: Path, meta: dict) -> torch.nn.Module:
    """The TextEncoder of an export folder in selfsup's names, with its tokenizer."""
    from selfsup.backbones import build_backbone
    from selfsup.config import from_dict
    from selfsup.pretext.text_tokenizer import load_tokenizer

    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:
        raise CheckpointError(f"{folder / 'model.safetensors'} is not a readable safetensors file: {err}") from None
    cfg = from_dict(BackboneConfig, {**json.loads(meta["backbone"]), "tokenizer": None}, "backbone")
    encoder = build_backbone(cfg)
    encoder.model.load_state_dict(state)
    if (folder / "tokenizer.json").is_file():
        encoder.tokenizer = load_tokenizer(folder / "tokenizer.json")
    return encoder.eval()
