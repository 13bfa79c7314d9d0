"""kNN accuracy: online kNN against epochs, else the final kNN next to random init."""

from __future__ import annotations

import math

import numpy as np

from selfsup.report.data import _final_knn, _has, _series, _Skip
from selfsup.report.figures._plot import _figure


def fig_knn(metrics, summary, model):
    from matplotlib.ticker import MaxNLocator

    trained, rand = _final_knn(summary)
    # online kNN: metrics.csv's knn/* columns against epochs, else summary["online_knn"]
    online = {c: _series(metrics, c, x="epoch") for c in metrics if c.startswith("knn/") and _has(metrics, c)}
    if not online and summary.get("online_knn"):
        pts = summary["online_knn"]
        online = {"knn/top1": (np.array([p["epoch"] for p in pts], float), np.array([p["top1"] for p in pts], float))}
    if online:
        fig, (ax,) = _figure(1, panel_w=7.0, panel_h=3.6)
        for col, (x, y) in online.items():
            ax.plot(x, y, marker="o", markersize=4, linewidth=1.6, label=f"online {col.split('/', 1)[-1]}")
        k = next(iter(trained), None)
        if k:
            ax.axhline(trained[k]["top1"], color="tab:green", linestyle="--", label=f"final top1 ({k})")
        if k and k in rand:
            ax.axhline(rand[k]["top1"], color="tab:gray", linestyle=":", label=f"random init top1 ({k})")
        ax.set_title("kNN accuracy on the test split during pretraining")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        return fig
    if trained:
        ks = list(trained)
        fig, (ax,) = _figure(1, panel_w=max(4.5, 2.2 * len(ks) + 2), panel_h=3.6)
        width = 0.38
        xs = np.arange(len(ks))
        bars = [("pretrained", trained, "tab:blue", -width / 2 if rand else 0.0)]
        if rand:
            bars.append(("random init", rand, "tab:gray", width / 2))
        for label, res, color, off in bars:
            vals = [res.get(k, {}).get("top1", math.nan) for k in ks]
            rects = ax.bar(xs + off, vals, width, label=label, color=color)
            ax.bar_label(rects, fmt="%.1f", fontsize=8, padding=2)
        ax.set_xticks(xs, [f"k = {k.lstrip('k')}" for k in ks])
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title("final kNN top-1: pretrained vs random init")
        top = max(v.get("top1", 0) for r in (trained, rand) for v in r.values())
        ax.set_ylim(0, max(5.0, 1.35 * top))
        ax.legend(loc="upper center", ncols=2, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        return fig
    reason = (summary.get("knn") or {}).get("skipped")
    raise _Skip(reason or "no kNN results (the run had eval.final_knn=false and no online kNN)")
