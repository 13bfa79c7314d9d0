"""Metrics read from a method's predictions inside its step (logged, watched by the collapse monitor)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def prediction_uniformity(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean entropy of ``softmax(logits / temperature)`` over the rows of ``logits`` (n, K), divided
    by ln K: 1.0 when every prediction is uniform, 0.0 when every one is a single prototype.
    A detached float32 scalar (K >= 2)."""
    with torch.no_grad():
        logp = F.log_softmax(logits.detach().float() / temperature, dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1).mean()
        return entropy / math.log(logits.shape[-1])
