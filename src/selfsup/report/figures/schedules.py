"""Schedules: learning rate, weight decay, and any EMA momentum / ``teacher_*`` column."""

from __future__ import annotations

from selfsup.report.data import _has, _schedule_columns, _Skip
from selfsup.report.figures._plot import _figure, _line_panel


def fig_schedules(metrics, summary, model):
    columns = [c for c in ("lr", "wd") if _has(metrics, c)]
    columns += [c for c in _schedule_columns(metrics) if _has(metrics, c)]
    if not columns:
        raise _Skip("metrics.csv has no lr / wd / momentum columns")
    names = {"lr": ("learning rate", "learning rate"), "wd": ("weight decay", "weight decay")}
    fig, axes = _figure(len(columns))
    for ax, col in zip(axes, columns):
        title, ylabel = names.get(col, (col, col.rsplit("/", 1)[-1]))
        _line_panel(ax, metrics, col, title=title, ylabel=ylabel)
    return fig
