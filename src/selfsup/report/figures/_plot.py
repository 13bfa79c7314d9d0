"""Plotting helpers shared by the report's figures (matplotlib's object API, never pyplot)."""

from __future__ import annotations

import math

import numpy as np
import torch

from selfsup.report.data import _series


def _figure(n_panels: int = 1, *, cols: int | None = None, panel_w: float = 4.6, panel_h: float = 3.2):
    from matplotlib.figure import Figure

    cols = cols or min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(panel_w * cols, panel_h * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _smooth(y: np.ndarray, frac: float = 0.05) -> np.ndarray:
    """Bias-corrected exponential moving average with a window of ~``frac`` of the run."""
    span = max(2.0, frac * len(y))
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(y)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(y):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def _line_panel(ax, metrics, column: str, *, title: str | None = None, ylabel: str | None = None,
                smooth: bool = False) -> None:
    x, y = _series(metrics, column)
    if smooth and len(y) > 20:
        ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
        ax.plot(x, _smooth(y), color="tab:blue", linewidth=1.8, label="smoothed")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.plot(x, y, color="tab:blue", linewidth=1.5, marker="o" if len(y) <= 30 else None, markersize=3)
    ax.set_title(title or column)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel or column)
    ax.grid(alpha=0.3)


def _to_display(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalized (B, 3, H, W) -> (B, H, W, 3) floats in [0, 1]."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.detach().float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
