"""Checkpoints written atomically: a kill at any moment leaves the previous file loadable."""

from __future__ import annotations

import os
import tempfile
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
        raise CheckpointError(f"{path} is not a readable selfsup checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a selfsup checkpoint (missing model/config)")
    return ckpt
