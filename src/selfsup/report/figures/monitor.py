"""Collapse monitor: embedding std, RankMe effective rank, student-teacher cosine, other ``monitor/*``."""

from __future__ import annotations

from selfsup.report.data import _has, _Skip
from selfsup.report.figures._plot import _figure, _line_panel
from selfsup.train.monitor import STD_ALARM, UNIFORM_ALARM


def fig_monitor(metrics, summary, model):
    columns = [c for c in metrics if c.startswith("monitor/") and _has(metrics, c)]
    columns += [c for c in metrics if "student_teacher_cos" in c and c not in columns and _has(metrics, c)]
    if not columns:
        raise _Skip("metrics.csv has no monitor/* columns")
    first = ["monitor/std", "monitor/rank"]
    columns = [c for c in first if c in columns] + [c for c in columns if c not in first]
    fig, axes = _figure(len(columns))
    for ax, col in zip(axes, columns):
        if col == "monitor/std":
            _line_panel(ax, metrics, col, title="embedding std (normalized, x sqrt(d))", ylabel="std")
            ax.axhline(STD_ALARM, color="tab:red", linestyle="--", linewidth=1.2,
                       label=f"collapse alarm ({STD_ALARM:g})")
            ax.set_ylim(bottom=0)
            ax.legend(loc="best", fontsize=8)
        elif col == "monitor/rank":
            _line_panel(ax, metrics, col, title="effective rank (RankMe)", ylabel="rank")
            ax.set_ylim(bottom=0)
        elif "student_teacher_cos" in col:
            _line_panel(ax, metrics, col, title="student-teacher cosine", ylabel="cosine")
        elif col == "monitor/uniformity":
            _line_panel(ax, metrics, col, title="prediction entropy / ln K", ylabel="uniformity")
            ax.axhline(UNIFORM_ALARM, color="tab:red", linestyle="--", linewidth=1.2,
                       label=f"uniform-collapse alarm ({UNIFORM_ALARM:g})")
            ax.legend(loc="best", fontsize=8)
        else:
            _line_panel(ax, metrics, col, title=col.split("/", 1)[-1].replace("_", " "))
    return fig
