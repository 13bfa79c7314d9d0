"""Representation-health diagnostics that need no labels (or only a few).

Cheap checks that catch the classic failure modes of self-supervised training
before any downstream evaluation:

* complete collapse - every input maps to (nearly) the same embedding
  (per-dimension std of L2-normalized features -> 0, pairwise cosine -> 1);
* dimensional collapse - embeddings span only a few directions
  (Jing et al., "Understanding Dimensional Collapse in Contrastive
  Self-supervised Learning", ICLR 2022), measured by RankMe
  (Garrido et al., "RankMe: Assessing the Downstream Performance of
  Pretrained Self-Supervised Representations by Their Rank", ICML 2023);
* alignment / uniformity of Wang & Isola, "Understanding Contrastive
  Representation Learning through Alignment and Uniformity on the
  Hypersphere" (ICML 2020).

:func:`format_table` renders any result dict of :mod:`selfsup.eval` as text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "rankme",
    "alignment",
    "uniformity",
    "per_dim_std",
    "mean_pair_cosine",
    "class_separation",
    "diagnose",
    "format_table",
    "COLLAPSE_STD_FRACTION",
    "COLLAPSE_COSINE",
    "DIMENSIONAL_COLLAPSE_FRACTION",
]

# Verdict thresholds used by diagnose():
# complete collapse when the mean per-dimension std of L2-normalized features is below
# 10% of the isotropic value 1/sqrt(D), or when two random embeddings have cosine > 0.95;
COLLAPSE_STD_FRACTION = 0.1
COLLAPSE_COSINE = 0.95
# dimensional collapse when RankMe is below 10% of the largest possible rank min(N, D).
DIMENSIONAL_COLLAPSE_FRACTION = 0.1


def _check_feats(feats: Tensor, min_rows: int = 2) -> Tensor:
    """A float32 ``(N, D)`` CPU/GPU tensor with at least ``min_rows`` rows."""
    if feats.ndim != 2 or feats.shape[0] < min_rows:
        raise ValueError(f"expected an (N, D) feature matrix with N >= {min_rows}, got {tuple(feats.shape)}")
    return feats.detach().to(torch.float32)


def _subsample(feats: Tensor, max_samples: int | None, seed: int) -> Tensor:
    """At most ``max_samples`` rows, drawn without replacement with a seeded generator."""
    if max_samples is None or feats.shape[0] <= max_samples:
        return feats
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(feats.shape[0], generator=generator)[:max_samples]
    return feats[keep.to(feats.device)]


def rankme(feats: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): a smooth effective rank of the embedding matrix.

    With singular values ``s_k`` of the (uncentered) ``(N, D)`` matrix,
    ``p_k = s_k / sum(s) + eps`` and ``RankMe = exp(-sum_k p_k log p_k)``.
    It is ``min(N, D)`` for equal singular values and ~1 for a rank-1 matrix.
    """
    x = _check_feats(feats, min_rows=1)
    singular = torch.linalg.svdvals(x.double() if x.numel() <= 2**24 else x)
    p = singular / singular.sum().clamp_min(1e-30) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2) -> float:
    """Alignment (Wang & Isola 2020): ``E ||f(x) - f(x+)||^alpha`` over positive pairs.

    ``z1[i]`` and ``z2[i]`` are embeddings of two views of the same input;
    both are L2-normalized first. 0 for identical pairs, 4 (alpha=2) for antipodal ones.
    """
    a, b = _check_feats(z1, 1), _check_feats(z2, 1)
    if a.shape != b.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((F.normalize(a, dim=1) - F.normalize(b, dim=1)).norm(dim=1).pow(alpha).mean())


def uniformity(z: Tensor, t: float = 2, *, max_samples: int | None = 4096, seed: int = 0) -> float:
    """Uniformity (Wang & Isola 2020): ``log E exp(-t ||f(x) - f(y)||^2)`` over distinct pairs.

    Computed on L2-normalized features over all pairs of at most
    ``max_samples`` rows (seeded subsample, bounding the cost at ~8M pairs).
    Lower is more uniform: 0 means complete collapse, and by Jensen's
    inequality the value cannot go (noticeably) below ``-2t`` (-4 for t=2),
    which uniformly spread points approach in high dimension.
    """
    x = F.normalize(_subsample(_check_feats(z), max_samples, seed), dim=1)
    sq_dists = torch.pdist(x, p=2).pow(2)
    # log-mean-exp, stable even when all exponents are very negative
    return float(torch.logsumexp(-t * sq_dists, dim=0) - math.log(sq_dists.numel()))


def per_dim_std(feats: Tensor) -> float:
    """Mean over dimensions of the per-dimension std of L2-normalized features.

    0 under complete collapse; about ``1/sqrt(D)`` for isotropic embeddings
    (the collapse monitor of SimSiam, Chen & He, CVPR 2021, Sec. 4.1).
    """
    x = F.normalize(_check_feats(feats), dim=1)
    return float(x.std(dim=0).mean())


def mean_pair_cosine(feats: Tensor, n_pairs: int = 10000, seed: int = 0) -> float:
    """Mean cosine similarity of ``n_pairs`` random pairs of distinct samples (seeded).

    ~0 for isotropic embeddings, 1 under complete collapse.
    """
    x = F.normalize(_check_feats(feats), dim=1)
    n = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, n, (n_pairs,), generator=generator)
    # an offset in [1, n) guarantees the second index differs from the first
    second = (first + torch.randint(1, n, (n_pairs,), generator=generator)) % n
    first, second = first.to(x.device), second.to(x.device)
    return float((x[first] * x[second]).sum(dim=1).mean())


def class_separation(feats: Tensor, labels: Tensor) -> float:
    """Between-class / within-class distance ratio of L2-normalized features.

    Definition: with class centroids ``mu_c`` of the L2-normalized features,
    *between* = mean Euclidean distance over all pairs of distinct centroids,
    *within* = mean over classes of the mean distance of a class's samples to
    its centroid. Returns ``between / within`` (larger = better separated;
    ``inf`` when every class is a single point). Samples labeled -1 are ignored.
    """
    x = F.normalize(_check_feats(feats, 1), dim=1)
    labels = labels.to(x.device)
    keep = labels >= 0
    x, labels = x[keep], labels[keep]
    classes = labels.unique()
    if classes.numel() < 2:
        raise ValueError("class_separation needs at least 2 labeled classes")
    centroids = torch.stack([x[labels == c].mean(dim=0) for c in classes])
    spreads = torch.stack([(x[labels == c] - centroids[i]).norm(dim=1).mean() for i, c in enumerate(classes)])
    between = torch.pdist(centroids, p=2).mean()
    within = spreads.mean()
    return float(between / within) if float(within) > 0 else math.inf


def _verdict(rank: float, std: float, cosine: float, num_samples: int, dim: int) -> str:
    """Plain-language health verdict from the thresholds defined at the top of this module."""
    if std < COLLAPSE_STD_FRACTION / math.sqrt(dim) or cosine > COLLAPSE_COSINE:
        return f"collapsed (all embeddings nearly identical: std {std:.3f})"
    max_rank = min(num_samples, dim)
    if rank < DIMENSIONAL_COLLAPSE_FRACTION * max_rank:
        return f"dimensional collapse: rank {rank:.1f} of {max_rank}"
    return f"healthy (rank {rank:.1f} of {max_rank})"


def diagnose(
    feats: Tensor,
    labels: Tensor | None = None,
    z_pairs: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """All health metrics of an ``(N, D)`` embedding matrix plus a plain-language verdict.

    Args:
        feats: embeddings (one row per sample).
        labels: optional class labels (-1 = unlabeled) for ``class_separation``.
        z_pairs: optional ``(z1, z2)`` embeddings of two views of the same
            inputs, for ``alignment``.

    Returns:
        ``{"samples", "dim", "rankme", "rank_fraction" (RankMe / min(N, D)),
        "per_dim_std", "isotropic_std" (1/sqrt(D)), "mean_pair_cosine",
        "uniformity", ["class_separation"], ["alignment"], "verdict"}``.
        Verdict thresholds: "collapsed" when per-dim std < 0.1/sqrt(D) or
        mean pair cosine > 0.95; "dimensional collapse" when RankMe <
        0.1 * min(N, D); otherwise "healthy".
    """
    x = _check_feats(feats)
    num_samples, dim = x.shape
    metrics: dict[str, Any] = {
        "samples": num_samples,
        "dim": dim,
        "rankme": rankme(x),
        "per_dim_std": per_dim_std(x),
        "isotropic_std": 1.0 / math.sqrt(dim),
        "mean_pair_cosine": mean_pair_cosine(x),
        "uniformity": uniformity(x),
    }
    metrics["rank_fraction"] = metrics["rankme"] / min(num_samples, dim)
    if labels is not None and int((labels >= 0).sum()) > 0 and labels[labels >= 0].unique().numel() >= 2:
        metrics["class_separation"] = class_separation(x, labels)
    if z_pairs is not None:
        metrics["alignment"] = alignment(*z_pairs)
    metrics["verdict"] = _verdict(
        metrics["rankme"], metrics["per_dim_std"], metrics["mean_pair_cosine"], num_samples, dim
    )
    return metrics


def _format_value(value: Any) -> str:
    """Numbers with a precision that fits their size; lists summarised; None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        if len(value) <= 4:
            return "[" + ", ".join(_format_value(v) for v in value) + "]"
        return f"{len(value)} values, last {_format_value(value[-1])}"
    if isinstance(value, Tensor) and value.numel() == 1:
        return _format_value(value.item())
    return str(value)


def _is_grid(metrics: Mapping[str, Any]) -> bool:
    """True when every value is a dict of scalars, e.g. ``{"k20": {"top1": .., "top5": ..}}``."""
    return bool(metrics) and all(
        isinstance(row, Mapping) and row and all(not isinstance(v, (Mapping, list, tuple)) for v in row.values())
        for row in metrics.values()
    )


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts to ``("outer.inner", value)`` rows, in insertion order."""
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, prefix=f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _is_number(cell: str) -> bool:
    """Whether a formatted cell holds a number (these are right-aligned)."""
    try:
        float(cell)
    except ValueError:
        return cell == "-"
    return True


def _column_width(cells: list[str], is_last: bool) -> int:
    """Width of a column; a long text in the last column (e.g. a verdict) does not widen the numbers."""
    if is_last and any(_is_number(cell) for cell in cells):
        return max(len(cell) for cell in cells if _is_number(cell))
    return max(len(cell) for cell in cells)


def _render(header: list[str] | None, rows: list[list[str]]) -> str:
    """First column and text left-aligned, numbers right-aligned, two spaces between columns."""
    table = ([header] if header else []) + rows
    ncols = len(table[0])
    widths = [_column_width([row[i] for row in table], i == ncols - 1) for i in range(ncols)]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0])]
        for cell, width in zip(row[1:], widths[1:]):
            cells.append(cell.rjust(width) if _is_number(cell) or row is header else cell.ljust(width))
        lines.append("  ".join(cells).rstrip())
    if header:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """A small aligned text table of an evaluation result, for printing.

    A dict of uniform sub-dicts (kNN: ``{"k20": {"top1", "top5"}, ...}``,
    few-shot: ``{"1shot": {"mean", "ci95"}, ...}``) becomes a grid with one
    row per outer key and one column per inner key; anything else (diagnostics,
    linear probe) becomes two columns ``name  value``, with nested keys joined
    by dots and long lists summarised by their length and last value.
    """
    if not metrics:
        return title or ""
    if _is_grid(metrics):
        columns: list[str] = []
        for row in metrics.values():
            columns.extend(key for key in row if key not in columns)
        header = [""] + columns
        rows = [[str(name)] + [_format_value(row.get(col)) for col in columns] for name, row in metrics.items()]
        body = _render(header, rows)
    else:
        body = _render(None, [[name, _format_value(value)] for name, value in _flatten(metrics)])
    return f"{title}\n{body}" if title else body
