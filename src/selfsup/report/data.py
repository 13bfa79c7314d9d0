"""Reading a run directory for the report: ``metrics.csv``, ``summary.json``, and the trained
model with its test features and pictures (loaded once, only when a figure needs them)."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("selfsup")

_N_PICTURES = 8  # images shown in attention / reconstruction grids


class _Skip(Exception):
    """A figure that cannot be drawn for this run; the message is shown in the report."""


@dataclass
class _Result:
    key: str
    title: str
    caption: str = ""
    path: Path | None = None
    note: str | None = None


# --------------------------------------------------------------------------------------
# inputs


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """``metrics.csv`` as ``{column: float array}``; empty cells (a column a row did not log,
    such as ``knn/top1`` on step rows) become NaN. Missing file: ``{}``."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    out: dict[str, np.ndarray] = {}
    for name in rows[0].keys():
        if name is None:
            continue
        values = []
        for row in rows:
            cell = row.get(name)
            try:
                values.append(float(cell) if cell not in (None, "") else math.nan)
            except ValueError:
                values.append(math.nan)
        out[name] = np.asarray(values, dtype=np.float64)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _series(metrics: dict[str, np.ndarray], column: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the rows where ``column`` has a finite value."""
    y = metrics.get(column)
    if y is None:
        return np.empty(0), np.empty(0)
    xs = metrics.get(x, np.arange(1, len(y) + 1, dtype=np.float64))
    keep = np.isfinite(y) & np.isfinite(xs)
    return xs[keep], y[keep]


def _has(metrics: dict[str, np.ndarray], column: str) -> bool:
    return _series(metrics, column)[1].size > 0


def _schedule_columns(metrics: dict[str, np.ndarray]) -> list[str]:
    """EMA momentum and teacher schedules (``momentum``, ``teacher_temp``, ``x/teacher_m``...)."""
    out = []
    for name in metrics:
        base = name.rsplit("/", 1)[-1]
        if name.startswith(("monitor/", "knn/")):
            continue
        if "momentum" in base or base.startswith("teacher_"):
            out.append(name)
    return out


def _final_knn(summary: dict) -> tuple[dict, dict]:
    knn = summary.get("knn") or {}
    return knn.get("trained") or {}, knn.get("random_init") or {}


# --------------------------------------------------------------------------------------
# the trained model and its test features (loaded once, only when a figure needs them)


class _Model:
    def __init__(self, run_dir: Path, data: str | None, max_points: int, device: str, seed: int) -> None:
        self.run_dir, self.data, self.max_points, self.seed = run_dir, data, max_points, seed
        self.device = torch.device(device)
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = build()
            except _Skip as err:
                self._cache[key] = err
            except Exception as err:  # report, don't crash: the other figures are still useful
                log.debug("report: %s failed", key, exc_info=True)
                skip = _Skip(f"{key} unavailable ({type(err).__name__}: {_first_line(err)})")
                skip.__cause__ = err  # write_report tells the user's own --data failing from the rest
                self._cache[key] = skip
        value = self._cache[key]
        if isinstance(value, _Skip):
            raise value
        return value

    @property
    def method(self):
        def build():
            from selfsup.evaluate import load_method

            ckpt = self.run_dir / "last.ckpt"
            if not ckpt.is_file():
                raise _Skip("no last.ckpt in the run directory")
            method, cfg, _ = load_method(ckpt, self.device)
            return method, cfg

        return self._get("checkpoint", build)

    @property
    def dataset(self):
        """The test split, subsampled to ``max_points`` with a seeded permutation."""

        def build():
            from selfsup.evaluate import load_feature_split, load_split

            method, cfg = self.method
            if method.modality == "image":
                full = load_split(cfg, cfg.data.test_split, self.data)
            else:  # other modalities: their labeled evaluation samples (texts: tokenized examples)
                full = load_feature_split(cfg, cfg.data.test_split, self.data)
            if len(full) > self.max_points:
                keep = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed))
                keep = keep[: self.max_points].sort().values
                return full.subset(keep, name=f"{full.name}[{self.max_points} of {len(full)}]")
            return full

        return self._get("test split", build)

    @property
    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        def build():
            from selfsup.evaluate import embed_dataset

            method, cfg = self.method
            return embed_dataset(method, self.dataset, device=self.device, batch_size=cfg.data.eval_batch_size,
                                 desc="report features")

        return self._get("features", build)

    def texts(self, n: int) -> list[str]:
        """``n`` test texts: the labeled test split's, else (a plain corpus) held-out blocks decoded."""
        try:
            texts = getattr(self.dataset, "texts", None)
        except _Skip:
            texts = None
        if texts:
            return list(texts[:n])

        def build():
            from dataclasses import replace

            from selfsup.registry import get_modality

            method, cfg = self.method
            src = self.data or cfg.data.source
            blocks = get_modality(method.modalities[0]).open(replace(cfg, data=replace(cfg.data, source=src)),
                                                             cfg.data.test_split).dataset
            step = max(1, len(blocks) // n)
            batch = blocks.gather(torch.arange(0, min(len(blocks), n * step), step))["tokens"]
            return [method.tokenizer.decode(row.tolist(), skip_special=True) for row in batch]

        return self._get("held-out texts", build)

    def _examples(self, n: int) -> tuple[torch.Tensor, list[str]]:
        """Indices of ``n`` test samples, one per class first so a grid shows variety, with titles."""
        ds = self.dataset
        labels = ds.labels
        order: list[int] = []
        if ds.has_labels:
            for c in range(len(ds.classes)):
                hits = (labels == c).nonzero().flatten()
                if hits.numel():
                    order.append(int(hits[0]))
                if len(order) == n:
                    break
        for i in range(len(ds)):
            if len(order) >= n:
                break
            if i not in order:
                order.append(i)
        idx = torch.tensor(order[:n], dtype=torch.long)
        return idx, [ds.classes[int(labels[i])] if ds.has_labels else f"#{int(i)}" for i in idx]

    def pictures(self, n: int = _N_PICTURES) -> tuple[torch.Tensor, list[str]]:
        """``n`` test images (uint8), one per class first so the grid shows variety, with titles."""
        if not hasattr(self.dataset, "images"):
            raise _Skip("the test split holds no images")
        idx, titles = self._examples(n)
        return self.dataset.images[idx], titles

    def clips(self, n: int = _N_PICTURES) -> tuple[torch.Tensor, list[str]]:
        """``n`` test audio clips (B, 1, samples), one per class first, with titles."""
        if not hasattr(self.dataset, "audio"):
            raise _Skip("the test split holds no audio")
        idx, titles = self._examples(n)
        return self.dataset.audio[idx], titles


    def videos(self, n: int = 3) -> tuple[torch.Tensor, list[str]]:
        """``n`` test clips (B, T, 3, H, W) uint8, one per class first, with titles (a streamed source decodes them)."""
        ds = self.dataset
        idx, titles = self._examples(n)
        if hasattr(ds, "video"):
            return ds.video[idx], titles
        try:
            samples = [ds[int(i)] for i in idx]
        except (TypeError, KeyError) as err:
            raise _Skip(f"the test split holds no clips ({_first_line(err)})") from None
        if any("video" not in sample for sample in samples):
            raise _Skip("the test split holds no readable clips")
        return torch.stack([sample["video"] for sample in samples]), titles


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""
