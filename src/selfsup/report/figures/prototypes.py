"""Prototype usage, for methods that declare the ``"prototypes"`` figure (``Method.figures``)."""

from __future__ import annotations

import numpy as np
import torch

from selfsup.report.data import _Skip
from selfsup.report.figures._plot import _figure


def _has_prototypes(method) -> bool:
    return "prototypes" in type(method).figures


@torch.no_grad()
def prototype_scores(method, feats: torch.Tensor) -> torch.Tensor:
    """(N, K) float CPU scores of backbone features against a method's prototypes: the method's own
    ``prototype_scores``, run on the method's device. A method that does not declare the
    ``"prototypes"`` figure has none."""
    if not _has_prototypes(method):
        raise _Skip("the method has no prototypes")
    device = next(method.parameters()).device
    return method.prototype_scores(feats.to(device)).float().cpu()


def fig_prototypes(metrics, summary, model):
    method, _ = model.method
    if not _has_prototypes(method):
        raise _Skip("the method has no prototypes")
    feats, _ = model.features
    was_training = method.training
    method.eval()
    try:
        scores = prototype_scores(method, feats)
    finally:
        method.train(was_training)
    k = scores.shape[1]
    counts = torch.bincount(scores.argmax(dim=1), minlength=k).numpy()
    used = int((counts > 0).sum())
    p = counts[counts > 0] / counts.sum()
    perplexity = float(np.exp(-(p * np.log(p)).sum()))
    ordered = np.sort(counts)[::-1]
    fig, (ax,) = _figure(1, panel_w=7.0, panel_h=3.6)
    ranks = np.arange(1, k + 1)
    if k <= 256:
        ax.bar(ranks, ordered, width=1.0, color="tab:purple")
    else:
        ax.fill_between(ranks, ordered, step="mid", color="tab:purple", alpha=0.8)
    ax.axhline(counts.sum() / k, color="tab:gray", linestyle="--", linewidth=1, label="uniform usage")
    ax.set_title(f"prototype usage on {int(counts.sum())} test images: {used} of {k} used, "
                 f"perplexity {perplexity:.1f}")
    ax.set_xlabel("prototype (sorted by usage)")
    ax.set_ylabel("images assigned (argmax)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig

