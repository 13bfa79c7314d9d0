"""Training loss against steps (raw and smoothed)."""

from __future__ import annotations

from selfsup.report.data import _has, _Skip
from selfsup.report.figures._plot import _figure, _line_panel


def fig_loss(metrics, summary, model):
    if not _has(metrics, "loss"):
        raise _Skip("metrics.csv has no loss values")
    fig, (ax,) = _figure(1, panel_w=7.0, panel_h=3.6)
    _line_panel(ax, metrics, "loss", title="training loss", ylabel="loss", smooth=True)
    return fig
