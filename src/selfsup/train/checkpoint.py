"""Checkpoints written atomically: a kill at any moment leaves the previous file loadable."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from selfsup.errors import CheckpointError


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace over ``path``
    (atomic on POSIX): readers see either the old checkpoint or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then os.replace over it: readers see the old
    file or the whole new one, never half of it (summary.json, eval results, report.html)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load with ``weights_only=True`` (no arbitrary code from the file). A run directory is
    accepted too and means its ``last.ckpt``."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt, truncated, or not a checkpoint at all
        raise CheckpointError(f"{path} is not a readable selfsup checkpoint: {_why_unreadable(path, err)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a selfsup checkpoint (missing model/config)")
    return ckpt


def _why_unreadable(path: Path, err: Exception) -> str:
    """One line on why torch.load failed; torch's own messages run to many lines, and for a file
    that is no checkpoint at all they suggest ``weights_only=False``, which would not help."""
    if not zipfile.is_zipfile(path):
        return "not a complete PyTorch file (truncated, corrupted, or another format)"
    if isinstance(err, pickle.UnpicklingError):
        return ("it holds Python objects beyond tensors and plain containers, which a safe "
                "(weights_only) load refuses; it was not written by selfsup")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def load_weights(module: torch.nn.Module, state: dict, source: str | Path) -> None:
    """``module.load_state_dict(state)``, strict, with a one-line :class:`CheckpointError` that
    counts what differs (torch lists every key, hundreds of them for a ResNet)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        own = module.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        reshaped = [k for k in own if k in state and getattr(state[k], "shape", None) is not None
                    and tuple(state[k].shape) != tuple(own[k].shape)]
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing from the file (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} not in the model (e.g. {unexpected[0]})")
        if reshaped:
            k = reshaped[0]
            parts.append(f"{len(reshaped)} of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in the model)")
        what = "; ".join(parts) or str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"{source}: its weights do not fit the model its config builds ({what}); overrides that "
            "change the backbone or heads do not apply to a trained checkpoint") from None
