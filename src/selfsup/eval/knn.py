"""Weighted k-nearest-neighbour classification on frozen features.

This is the non-parametric evaluation of Wu et al., "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination" (CVPR 2018), in the form
used by DINO (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021):

1. L2-normalize bank (train) and query (test) features, so that the dot
   product is the cosine similarity;
2. for each query take the k most similar bank samples;
3. each neighbour votes for its own class with weight ``exp(sim / T)``,
   ``T = 0.07``;
4. the class with the largest summed vote is the prediction (top-5: the five
   largest).

Queries are processed in chunks: one matmul and one ``topk`` with ``max(ks)``
per chunk; every smaller k reuses the leading columns of the same sorted
``topk`` result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_classify"]

log = logging.getLogger(__name__)

# Similarity entries per chunk (chunk_size * bank_size) when chunk_size is not given:
# 2**25 float32 entries = 128 MiB, large enough for efficient matmuls, small enough for any machine.
_AUTO_CHUNK_ENTRIES = 2**25


def _check_labels(labels: Tensor, name: str, num_rows: int) -> Tensor:
    """Validate a label vector: 1-D, one per feature row, no -1 (unlabeled) entries."""
    if labels.ndim != 1 or labels.shape[0] != num_rows:
        raise ValueError(f"{name} must be 1-D with {num_rows} entries, got shape {tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(
            f"{name} contain negative labels (-1 marks unlabeled samples); kNN evaluation needs a "
            "fully labeled split: use a labeled train/test split or drop the unlabeled samples"
        )
    return labels.long()


def _effective_ks(ks: Sequence[int], bank_size: int) -> list[int]:
    """Sorted distinct k values, clamped (with a logged warning) to the bank size."""
    if not ks:
        raise ValueError("ks must contain at least one k")
    result: list[int] = []
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > bank_size:  # one log line; a warnings.warn would print a line of torch's decorator
            log.warning("k=%d is larger than the feature bank (%d samples); using k=%d", k, bank_size, bank_size)
            k = bank_size
        if k not in result:
            result.append(k)
    return sorted(result)


def _auto_chunk_size(bank_size: int) -> int:
    """Number of queries per chunk so that the similarity block stays around 128 MiB."""
    return max(1, _AUTO_CHUNK_ENTRIES // max(1, bank_size))


def _class_votes(neighbour_labels: Tensor, weights: Tensor, num_classes: int) -> Tensor:
    """Sum the weights of the neighbours per class: ``(Q, k)`` labels/weights -> ``(Q, C)`` votes."""
    votes = torch.zeros(neighbour_labels.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, neighbour_labels, weights)


def _count_correct(votes: Tensor, targets: Tensor, top: int) -> int:
    """How many targets are among the ``top`` highest-voted classes."""
    predicted = votes.topk(top, dim=1).indices
    return int((predicted == targets[:, None]).any(dim=1).sum())


@torch.inference_mode()
def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    leave_one_out: bool = False,
) -> dict[str, dict[str, float]]:
    """Weighted kNN accuracy of ``test_feats`` against the ``train_feats`` bank.

    Args:
        train_feats: ``(N, D)`` bank features (any float dtype; computed in float32).
        train_labels: ``(N,)`` int labels in ``[0, C)``; a -1 (unlabeled) raises ``ValueError``.
        test_feats: ``(Q, D)`` query features.
        test_labels: ``(Q,)`` int labels in ``[0, C)``.
        ks: neighbourhood sizes to report (DINO reports 20 and 200). A k larger
            than the bank is clamped to the bank size with a warning, and the
            result key uses the clamped value.
        temperature: ``T`` in the vote weight ``exp(cosine / T)`` (0.07 as in Wu et al.).
        num_classes: number of classes ``C``; inferred from the labels when ``None``.
        chunk_size: queries per similarity block; by default sized so one block
            of ``chunk_size x N`` similarities is about 128 MiB.
        leave_one_out: the queries are the bank itself, in the same order (a dataset
            without a separate test split): query ``i`` never votes for itself, and k is
            clamped to ``N - 1``. Without it, each query's nearest neighbour is its own
            feature (cosine 1) and the score says little.

    Returns:
        ``{"k20": {"top1": %, "top5": %}, "k200": {...}}``. ``top5`` is only
        present when there are at least 5 classes (otherwise it is trivially 100).
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"expected (N, D) bank and (Q, D) query features with the same D, got "
            f"{tuple(train_feats.shape)} and {tuple(test_feats.shape)}"
        )
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("kNN needs a non-empty bank and at least one query")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = train_feats.device
    bank_labels = _check_labels(train_labels, "train_labels", train_feats.shape[0]).to(device)
    query_labels = _check_labels(test_labels, "test_labels", test_feats.shape[0]).to(device)
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    elif int(max(bank_labels.max(), query_labels.max())) >= num_classes:
        raise ValueError(f"labels go beyond num_classes={num_classes}")
    if leave_one_out and (train_feats.shape[0] != test_feats.shape[0] or train_feats.shape[0] < 2):
        raise ValueError(f"leave_one_out needs the bank as the queries (N >= 2), got "
                         f"{train_feats.shape[0]} bank and {test_feats.shape[0]} query samples")
    k_values = _effective_ks(ks, train_feats.shape[0] - int(leave_one_out))
    k_max = k_values[-1]
    step = chunk_size if chunk_size is not None else _auto_chunk_size(train_feats.shape[0])
    if step < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    report_top5 = num_classes >= 5

    bank_t = F.normalize(train_feats.to(torch.float32), dim=1).t().contiguous()  # (D, N)
    correct1 = dict.fromkeys(k_values, 0)
    correct5 = dict.fromkeys(k_values, 0)
    for start in range(0, test_feats.shape[0], step):
        queries = F.normalize(test_feats[start : start + step].to(device, torch.float32), dim=1)
        targets = query_labels[start : start + step]
        similarity = queries @ bank_t  # (q, N) cosine similarities
        if leave_one_out:  # query start + i is bank entry start + i
            rows = torch.arange(similarity.shape[0], device=similarity.device)
            similarity[rows, rows + start] = float("-inf")
        top_sim, top_idx = similarity.topk(k_max, dim=1, largest=True, sorted=True)
        del similarity
        weights = top_sim.div_(temperature).exp_()
        neighbour_labels = bank_labels[top_idx]
        for k in k_values:
            votes = _class_votes(neighbour_labels[:, :k], weights[:, :k], num_classes)
            correct1[k] += _count_correct(votes, targets, 1)
            if report_top5:
                correct5[k] += _count_correct(votes, targets, 5)

    total = test_feats.shape[0]
    results: dict[str, dict[str, float]] = {}
    for k in k_values:
        entry = {"top1": 100.0 * correct1[k] / total}
        if report_top5:
            entry["top5"] = 100.0 * correct5[k] / total
        results[f"k{k}"] = entry
    return results
