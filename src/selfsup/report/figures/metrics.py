"""Throughput and method-specific metrics."""

from __future__ import annotations

from selfsup.report.data import _has, _schedule_columns, _Skip
from selfsup.report.figures._plot import _figure, _line_panel

_BASE_COLUMNS = {"step", "epoch", "loss", "lr", "wd", "img_s"}


def fig_metrics(metrics, summary, model):
    known = _BASE_COLUMNS | set(_schedule_columns(metrics))
    columns = [c for c in metrics if c not in known and not c.startswith(("monitor/", "knn/"))
               and "student_teacher_cos" not in c and _has(metrics, c)]
    if _has(metrics, "img_s"):
        columns = ["img_s", *columns]
    if not columns:
        raise _Skip("metrics.csv has no throughput or method metrics")
    fig, axes = _figure(len(columns))
    for ax, col in zip(axes, columns):
        if col == "img_s":
            _line_panel(ax, metrics, col, title="throughput", ylabel="images / s", smooth=True)
            ax.set_ylim(bottom=0)
        else:
            _line_panel(ax, metrics, col, title=col, smooth=True)
    return fig
