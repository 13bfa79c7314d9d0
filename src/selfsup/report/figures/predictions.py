"""What a language model predicts on a few test texts, for text methods that declare the
``"predictions"`` figure (masked tokens with the top guesses, or a greedy continuation)."""

from __future__ import annotations

import textwrap

import torch

from selfsup.report.data import _Skip
from selfsup.report.figures._plot import _figure

N_TEXTS = 6


def fig_predictions(metrics, summary, model):
    method, _ = model.method
    if "predictions" not in type(method).figures:
        raise _Skip("the method does not show predictions (no 'predictions' figure)")
    texts = model.texts(N_TEXTS)
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            lines = method.predictions([t[:400] for t in texts])
    finally:
        method.train(was_training)
    wrapped = [textwrap.fill(line.replace("\n", " ⏎ "), 110) for line in lines]
    height = 0.9 + 0.19 * sum(w.count("\n") + 2 for w in wrapped)
    fig, axes = _figure(1, cols=1, panel_w=11.0, panel_h=height)
    ax = axes[0]
    ax.axis("off")
    ax.text(0.0, 1.0, "\n\n".join(wrapped), va="top", ha="left", family="monospace", fontsize=7.5,
            transform=ax.transAxes)
    fig.suptitle(f"{method.name}: predictions on test texts")
    return fig
