"""Originals, masked inputs and reconstructions, for methods that declare the ``"reconstruction"``
figure (``Method.figures``)."""

from __future__ import annotations

import torch

from selfsup.report.data import _Skip
from selfsup.report.figures._plot import _figure, _to_display


def fig_reconstruction(metrics, summary, model):
    method, _ = model.method
    if "reconstruction" not in type(method).figures:
        raise _Skip("the method has no reconstruct()")
    images, titles = model.pictures()
    x = method.preprocess({"images": images.to(model.device)})
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            masked, recon = method.reconstruct(x)
    finally:
        method.train(was_training)
    rows = [("original", x), ("masked", masked), ("reconstruction", recon)]
    n = x.shape[0]
    fig, axes = _figure(3 * n, cols=n, panel_w=1.7, panel_h=1.8)
    for r, (label, batch) in enumerate(rows):
        shown = _to_display(batch, method.eval_mean, method.eval_std)
        for i in range(n):
            ax = axes[r * n + i]
            ax.imshow(shown[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[i], fontsize=8)
        axes[r * n].set_ylabel(label, fontsize=8)
    fig.suptitle("masked-image modelling: originals, masked inputs, reconstructions")
    return fig

