"""N-way K-shot few-shot evaluation of frozen features.

Episodes as in Vinyals et al., "Matching Networks for One Shot Learning"
(NeurIPS 2016): pick N classes, K labeled *support* samples and a fixed
number of *query* samples per class. The classifier is the one of Tian et
al., "Rethinking Few-Shot Image Classification: a Good Embedding Is All You
Need?" (ECCV 2020): logistic regression on L2-normalized support features.
Accuracy is averaged over episodes and reported with a 95% confidence
interval half-width ``1.96 * std / sqrt(episodes)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["few_shot"]


def _as_numpy(feats: Tensor, labels: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalized float64 features and int labels as numpy arrays."""
    if feats.ndim != 2 or labels.ndim != 1 or feats.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected (N, D) features and (N,) labels, got {tuple(feats.shape)} and {tuple(labels.shape)}"
        )
    x = torch.nn.functional.normalize(feats.detach().to("cpu", torch.float64), dim=1).numpy()
    return x, labels.detach().cpu().numpy().astype(np.int64)


def _usable_classes(labels: np.ndarray, needed: int) -> dict[int, np.ndarray]:
    """Indices per class, for the classes with at least ``needed`` samples (label -1 ignored)."""
    classes: dict[int, np.ndarray] = {}
    for cls in np.unique(labels):
        if cls < 0:
            continue
        indices = np.flatnonzero(labels == cls)
        if indices.size >= needed:
            classes[int(cls)] = indices
    return classes


def _sample_episode(
    pools: dict[int, np.ndarray], n_way: int, max_shot: int, n_query: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Support indices ``(n_way, max_shot)`` and query indices ``(n_way, n_query)``.

    Row ``i`` holds episode class ``i``; the K-shot support of the episode is
    the first K columns, so all shot settings share the same classes and queries.
    """
    chosen = rng.choice(np.array(sorted(pools)), size=n_way, replace=False)
    support, query = [], []
    for cls in chosen:
        picked = rng.choice(pools[int(cls)], size=max_shot + n_query, replace=False)
        support.append(picked[:max_shot])
        query.append(picked[max_shot:])
    return np.stack(support), np.stack(query)


def _episode_accuracy(x: np.ndarray, support: np.ndarray, query: np.ndarray, k: int, C: float) -> float:
    """Accuracy (%) of logistic regression fit on the K-shot support, scored on the queries."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n_way = support.shape[0]
    train_idx = support[:, :k].reshape(-1)
    train_y = np.repeat(np.arange(n_way), k)
    query_y = np.repeat(np.arange(n_way), query.shape[1])
    model = LogisticRegression(C=C, max_iter=1000, solver="lbfgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x[train_idx], train_y)
    predicted = model.predict(x[query.reshape(-1)])
    return 100.0 * float((predicted == query_y).mean())


def _mean_and_ci95(accuracies: list[float]) -> dict[str, float]:
    """Mean and 95% CI half-width ``1.96 * std / sqrt(n)`` (sample std, ddof=1)."""
    values = np.asarray(accuracies, dtype=np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "ci95": 1.96 * std / float(np.sqrt(values.size))}


def few_shot(
    feats: Tensor,
    labels: Tensor,
    *,
    n_way: int = 5,
    k_shot: Sequence[int] = (1, 5, 10),
    n_query: int = 15,
    episodes: int = 100,
    seed: int = 0,
    C: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Mean N-way K-shot accuracy over random episodes from a labeled feature set.

    Only classes with at least ``max(k_shot) + n_query`` samples take part
    (samples labeled -1 are ignored); fewer than ``n_way`` such classes raises
    ``ValueError``. Each episode draws ``n_way`` classes and, per class,
    ``max(k_shot)`` support plus ``n_query`` query samples; each K uses the
    first K support samples, so the shot settings are compared on identical
    episodes. Episodes are drawn from ``numpy.random.default_rng(seed)``.

    Returns:
        ``{"1shot": {"mean": %, "ci95": %}, "5shot": {...}, ...}``.
    """
    if n_way < 2 or n_query < 1 or episodes < 1 or not k_shot or min(k_shot) < 1:
        raise ValueError(
            f"need n_way >= 2, n_query >= 1, episodes >= 1 and shots >= 1; got n_way={n_way}, "
            f"n_query={n_query}, episodes={episodes}, k_shot={tuple(k_shot)}"
        )
    x, y = _as_numpy(feats, labels)
    shots = sorted(set(int(k) for k in k_shot))
    needed = shots[-1] + n_query
    pools = _usable_classes(y, needed)
    if len(pools) < n_way:
        raise ValueError(
            f"{n_way}-way few-shot needs {n_way} classes with at least {needed} samples each "
            f"({shots[-1]} shots + {n_query} queries); only {len(pools)} classes qualify"
        )
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    rng = np.random.default_rng(seed)
    accuracies: dict[int, list[float]] = {k: [] for k in shots}
    # Each fit has at most n_way * max_shot samples: BLAS threads only add synchronisation cost.
    with threadpool_limits(limits=1):
        for _ in range(episodes):
            support, query = _sample_episode(pools, n_way, shots[-1], n_query, rng)
            for k in shots:
                accuracies[k].append(_episode_accuracy(x, support, query, k, C))
    return {f"{k}shot": _mean_and_ci95(accuracies[k]) for k in shots}
