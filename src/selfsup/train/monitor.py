"""Collapse monitor: cheap signs, every step, that a run is learning nothing.

- ``std``: mean per-dimension std of the L2-normalized embeddings of one view, times sqrt(d),
  so 1.0 is an isotropic spread and 0.0 is complete collapse (SimSiam, Chen & He 2021, fig. 2).
- ``rank``: RankMe (Garrido et al. 2023) on the same batch, every ``every`` steps: the effective
  number of dimensions in use, bounded by min(batch, d).
- ``uniformity`` (methods that predict a distribution over K prototypes: DINO, DINOv2, SwAV report
  ``monitor/uniformity``): mean entropy of the student's predictions over ln K. Near 1.0 every
  prediction is uniform, whatever the input: the collapse those losses can fall into while the
  backbone's embeddings still look healthy (the loss then sits at ln K; a ResNet DINO without BN in
  its head did so within 100 steps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STD_ALARM = 0.1  # normalized std below this fraction of isotropic means near-collapse
UNIFORM_ALARM = 0.995  # prediction entropy above this fraction of ln K: (almost) uniform predictions


def embedding_std(z: torch.Tensor) -> float:
    z = F.normalize(z.float(), dim=1)
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))


def effective_rank(z: torch.Tensor, eps: float = 1e-7) -> float:
    s = torch.linalg.svdvals(z.float())
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


class CollapseMonitor:
    def __init__(self, every: int = 50) -> None:
        self.every = every
        self.last_std: float | None = None
        self.last_rank: float | None = None
        self.min_std = math.inf
        self.alarms = 0
        self.last_uniformity: float | None = None
        self.uniform_alarms = 0

    def update(self, z: torch.Tensor | None, step: int, metrics: dict[str, float] | None = None) -> dict[str, float]:
        """Update from one step's embeddings ``z`` and the method's metrics (read for
        ``monitor/uniformity``); returns the monitor's own metrics for the log."""
        uniformity = (metrics or {}).get("monitor/uniformity")
        if uniformity is not None:
            self.last_uniformity = float(uniformity)
            if self.last_uniformity > UNIFORM_ALARM:
                self.uniform_alarms += 1
        if z is None or z.ndim != 2 or z.shape[0] < 2:
            return {}
        out = {"monitor/std": embedding_std(z)}
        self.last_std = out["monitor/std"]
        self.min_std = min(self.min_std, self.last_std)
        if self.last_std < STD_ALARM:
            self.alarms += 1
        if step % self.every == 0 or self.last_rank is None:
            self.last_rank = effective_rank(z)
        out["monitor/rank"] = self.last_rank  # the latest estimate, so every CSV row has the column
        return out

    @property
    def alarming(self) -> bool:
        return self.alarm_reason is not None

    @property
    def alarm_reason(self) -> str | None:
        """What looks collapsed at the last step, for the progress line; None when nothing does."""
        if self.last_std is not None and self.last_std < STD_ALARM:
            return f"std {self.last_std:.3f}"
        if self.last_uniformity is not None and self.last_uniformity > UNIFORM_ALARM:
            return f"uniform predictions {self.last_uniformity:.4f}"
        return None

    def summary(self) -> dict[str, float | int | None]:
        return {"last_std": self.last_std, "min_std": None if math.isinf(self.min_std) else self.min_std,
                "last_rank": self.last_rank, "alarm_steps": self.alarms,
                "last_uniformity": self.last_uniformity, "uniform_alarm_steps": self.uniform_alarms}
