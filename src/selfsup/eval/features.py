"""Frozen-feature extraction and a small on-disk feature cache.

Every evaluation protocol in :mod:`selfsup.eval` (kNN, linear probe, few-shot,
diagnostics) works on a matrix of frozen features plus integer labels. This
module turns a caller-supplied embedding function and an iterable of batch
dicts into that pair, and caches the result on disk so that repeated
evaluations of the same checkpoint on the same data are free.

Nothing here knows about images: a batch is any ``dict`` with an int64
``"labels"`` tensor; everything else in it is passed untouched to ``embed``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

__all__ = ["extract_features", "FeatureCache", "make_key"]

log = logging.getLogger("selfsup")

# Below this many batches a progress bar is more noise than help.
_MIN_BATCHES_FOR_PROGRESS = 5


def _move_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Return a shallow copy of ``batch`` with every tensor value moved to ``device``."""
    return {
        name: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
        for name, value in batch.items()
    }


def _show_progress(total: int | None) -> bool:
    """Progress bars only on an interactive terminal and only for long-enough runs."""
    if not sys.stderr.isatty():
        return False
    return total is None or total >= _MIN_BATCHES_FOR_PROGRESS


def _batch_labels(batch: dict[str, Any]) -> Tensor:
    """The batch's labels as a flat int64 CPU tensor; a clear error when missing."""
    if "labels" not in batch:
        raise ValueError(
            f"every batch must contain a 'labels' tensor (got keys {sorted(batch)}); "
            "use -1 for unlabeled samples"
        )
    return torch.as_tensor(batch["labels"]).reshape(-1).to("cpu", torch.int64)


@torch.inference_mode()
def _embed_batches(
    embed: Callable[[dict[str, Any]], Tensor],
    batches: Iterable[dict[str, Any]],
    device: torch.device | str,
    bar_desc: str,
    total: int | None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-batch float32 CPU features and int64 labels, computed under inference mode."""
    feature_chunks: list[Tensor] = []
    label_chunks: list[Tensor] = []
    bar = tqdm(batches, desc=bar_desc, total=total, disable=not _show_progress(total), leave=False)
    for batch in bar:
        labels = _batch_labels(batch)
        out = embed(_move_to_device(batch, device))
        out = out.reshape(out.shape[0], -1).to("cpu", torch.float32)
        if out.shape[0] != labels.shape[0]:
            raise ValueError(
                f"embed returned {out.shape[0]} feature rows for a batch of {labels.shape[0]} labels"
            )
        feature_chunks.append(out)
        label_chunks.append(labels)
    return feature_chunks, label_chunks


def extract_features(
    embed: Callable[[dict[str, Any]], Tensor],
    batches: Iterable[dict[str, Any]],
    *,
    device: torch.device | str,
    desc: str = "features",
    total: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run a frozen encoder over a dataset and collect ``(features, labels)``.

    Args:
        embed: maps a batch dict (tensors already on ``device``) to a
            ``(B, D)`` feature tensor (higher-rank outputs are flattened to
            ``(B, -1)``). It is called under :func:`torch.inference_mode`, so
            the caller should also have put the model in ``eval()`` mode.
        batches: iterable of dicts, each holding an int64 ``"labels"``
            tensor of shape ``(B,)`` (-1 for unlabeled samples) and whatever
            inputs ``embed`` needs.
        device: where the batch tensors are moved before calling ``embed``.
        desc: label of the progress bar (shown only on a terminal, and only
            for 5 or more batches when ``total`` is known).
        total: number of batches, if known (defaults to ``len(batches)``).

    Returns:
        ``(features, labels)``: float32 ``(N, D)`` and int64 ``(N,)`` on CPU.
        They are ordinary tensors (concatenated outside inference mode), so
        they can be modified in place or fed to a trainable probe.
    """
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    feature_chunks, label_chunks = _embed_batches(embed, batches, device, desc, total)
    if not feature_chunks:
        raise ValueError("no batches to extract features from (is the dataset empty?)")
    return torch.cat(feature_chunks), torch.cat(label_chunks)


def make_key(*parts: object) -> str:
    """A short stable cache key: the first 16 hex characters of sha1 over the parts' ``repr``.

    Build it from everything that determines the features, e.g.
    ``make_key(ckpt_path, ckpt_size, ckpt_mtime, dataset_name, split, transform_id)``.
    """
    digest = hashlib.sha1(repr(parts).encode("utf-8"))
    return digest.hexdigest()[:16]


class FeatureCache:
    """A directory of ``<key>.pt`` files holding ``(features, labels)`` pairs.

    Writes are atomic (``torch.save`` to a temporary file in the same
    directory, then :func:`os.replace`), so an interrupted run never leaves a
    half-written entry behind; an entry that cannot be read anyway (truncated,
    corrupt, wrong format) counts as a cache miss and is recomputed.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        """File that stores the entry for ``key``."""
        if not key or any(sep in key for sep in ("/", "\\", os.sep)):
            raise ValueError(f"cache key must be a plain file-name stem, got {key!r}")
        return self.directory / f"{key}.pt"

    def get(self, key: str) -> tuple[Tensor, Tensor] | None:
        """Return the cached ``(features, labels)`` for ``key``, or ``None`` on a miss."""
        file = self.path(key)
        if not file.is_file():
            return None
        try:
            entry = torch.load(file, map_location="cpu", weights_only=True)
            feats, labels = entry["features"], entry["labels"]
        except Exception:  # noqa: BLE001 - any unreadable entry is simply a miss
            return None
        if not (isinstance(feats, Tensor) and isinstance(labels, Tensor)):
            return None
        if feats.ndim != 2 or labels.ndim != 1 or feats.shape[0] != labels.shape[0]:
            return None
        return feats, labels

    def put(self, key: str, feats: Tensor, labels: Tensor) -> Path | None:
        """Store ``(feats, labels)`` under ``key`` atomically; returns the file written, or None
        when it could not be written (a full disk, a read-only folder): a cache that cannot
        grow costs time on the next run, so that is logged, and the caller's work goes on."""
        file = self.path(key)
        entry = {
            "features": feats.detach().to("cpu", torch.float32).contiguous(),
            "labels": labels.detach().to("cpu", torch.int64).contiguous(),
        }
        tmp_name = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # the writer's pid in the name tells a later run whether the file is an orphan
            fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.pt.{os.getpid()}-", suffix=".tmp", dir=self.directory)
            with os.fdopen(fd, "wb") as handle:
                torch.save(entry, handle)
            os.replace(tmp_name, file)
            tmp_name = None
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            log.warning("features not cached in %s: %s", self.directory, _first_line(err))
            return None
        finally:
            if tmp_name is not None and os.path.exists(tmp_name):
                os.unlink(tmp_name)
        return file


def _first_line(err: BaseException) -> str:
    """The error's first line; for a write that failed inside torch.save, the OSError behind it."""
    cause = err.__cause__ or err.__context__
    if isinstance(err, RuntimeError) and isinstance(cause, OSError):
        err = cause
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
