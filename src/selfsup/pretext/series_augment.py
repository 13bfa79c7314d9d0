"""Views of multivariate series for the joint-embedding methods (SimCLR, BYOL, SimSiam, Barlow Twins,
VICReg, MoCo): jittering, scaling and permutation (Um et al. 2017, "Data Augmentation of Wearable
Sensor Data for Parkinson's Disease Monitoring using Convolutional Neural Networks", sec. 3; the weak
and strong views of TS-TCC, Eldele et al. 2021, "Time-Series Representation Learning via Temporal
and Contextual Contrasting", IJCAI, sec. 4.1, official ``dataloader/augmentations.py``).

One view of a batch x (B, C, T), in this order, each step on the batch's device:

1. permutation (``permute_max_segments`` = M >= 2): each series draws k ~ U{1, ..., M - 1} (the
   official ``randint(1, max_segments)``), cuts its time axis at k - 1 distinct random points into k
   contiguous segments and lays them out in a random order; every channel of a series moves the same
   way (the official code writes channel 0's permuted values into every channel, which only a
   univariate series survives). Cut points are drawn in 1 .. T - 1, so no segment is empty (the
   official ``np.random.choice(T - 2, k - 1)`` can cut at 0, leaving an empty first segment);
2. scaling (``scale_sigma`` > 0): x · s with s ~ N(``scale_mean``, ``scale_sigma``²), one factor per
   (series, channel) (``scale_per: channel``, Um et al.'s scaling) or one per (series, time step)
   shared by the channels (``scale_per: step``, what TS-TCC's ``scaling`` computes);
3. jittering (``jitter_sigma`` > 0): x + ε, ε ~ N(0, ``jitter_sigma``²) per value.

``SERIES_WEAK`` and ``SERIES_STRONG`` are TS-TCC's two views with its HAR settings (weak: scaling,
factor N(2, 1.1²) per time step; strong: permutation into up to 7 segments then jitter σ = 0.8), the
default ``augment.series`` of a run on series; the paper tunes them per dataset (its configs:
Epilepsy 0.001 / 0.001 / 5 segments, SleepEDF 1.5 / 2 / 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfsup.errors import ConfigError

__all__ = ["SERIES_STRONG", "SERIES_WEAK", "SeriesAugment", "SeriesViewConfig", "permute_segments"]


@dataclass
class SeriesViewConfig:
    """One view of a series (see the module docstring); every step is off at its zero value."""

    jitter_sigma: float = 0.0
    scale_mean: float = 1.0
    scale_sigma: float = 0.0
    scale_per: str = "channel"  # channel (Um et al.) | step (TS-TCC's code)
    permute_max_segments: int = 0  # M: up to M - 1 segments; 0 or 1: no permutation

    def validate(self) -> None:
        if self.jitter_sigma < 0 or self.scale_sigma < 0:
            raise ConfigError(f"jitter_sigma={self.jitter_sigma} and scale_sigma={self.scale_sigma} must be >= 0")
        if self.scale_per not in ("channel", "step"):
            raise ConfigError(f"scale_per={self.scale_per!r}: must be channel or step")
        if self.permute_max_segments < 0:
            raise ConfigError(f"permute_max_segments={self.permute_max_segments}: must be >= 0")


SERIES_WEAK = SeriesViewConfig(scale_mean=2.0, scale_sigma=1.1, scale_per="step")
SERIES_STRONG = SeriesViewConfig(jitter_sigma=0.8, permute_max_segments=8)


def permute_segments(x: Tensor, max_segments: int) -> Tensor:
    """x (B, C, T) with each series' time axis cut into k ~ U{1..max_segments - 1} contiguous segments
    at distinct random points and the segments shuffled, the same for all its channels."""
    b, _, t = x.shape
    if max_segments < 2 or t < 2:
        return x
    dev = x.device
    k = torch.randint(1, max_segments, (b, 1), device=dev).clamp_max(t)  # segments per series
    # k - 1 distinct cuts among the T - 1 gaps between steps: the k - 1 smallest of uniform noise
    rank = torch.argsort(torch.argsort(torch.rand(b, t - 1, device=dev), dim=1), dim=1)
    cut = rank < (k - 1)
    segment = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), cut.long().cumsum(1)], 1)  # (B, T)
    # a random order of the segments: sort steps by (the segment's random rank, position in the series)
    seg_rank = torch.argsort(torch.argsort(torch.rand(b, max_segments, device=dev), dim=1), dim=1)
    key = seg_rank.gather(1, segment) * t + torch.arange(t, device=dev)
    order = torch.argsort(key, dim=1)
    return x.gather(2, order.unsqueeze(1).expand_as(x))


class SeriesAugment(nn.Module):
    """One batched view of series (B, C, T) per ``SeriesViewConfig``; no parameters."""

    def __init__(self, cfg: SeriesViewConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x: Tensor) -> Tensor:
        c = self.cfg
        x = permute_segments(x, c.permute_max_segments)
        if c.scale_sigma > 0 or c.scale_mean != 1.0:
            b, ch, t = x.shape
            shape = (b, ch, 1) if c.scale_per == "channel" else (b, 1, t)
            x = x * (c.scale_mean + c.scale_sigma * torch.randn(shape, device=x.device, dtype=x.dtype))
        if c.jitter_sigma > 0:
            x = x + c.jitter_sigma * torch.randn_like(x)
        return x
