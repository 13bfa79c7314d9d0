"""TS2Vec's hierarchical contrastive loss (Yue et al. 2022, "TS2Vec: Towards Universal Representation
of Time Series", AAAI, sec. 3.3 and Algorithm 1; official ``models/losses.py``).

Two views' timestamp representations ``z1``, ``z2`` (B, T, D) of the same overlapping segment are
contrasted at every scale: at each level, the instance-wise loss (eq. 3: at each timestamp t, a
series' representation in one view against the other series' at t in both views) and the temporal
loss (eq. 2: within a series, timestamp t in one view against the other timestamps of both views),
then both views are max-pooled by 2 along time, until one timestamp is left (where only the
instance loss applies). Similarities are raw dot products (no temperature, no normalization), as
the official code. The total is the mean over levels of

    alpha * L_inst + (1 - alpha) * L_temp         (alpha = 0.5; L_temp from level ``temporal_unit`` on)

All three are computed in float32 under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses._precision import fp32_loss

__all__ = ["hierarchical_contrastive_loss", "instance_contrastive_loss", "temporal_contrastive_loss"]


def _pair_loss(z: torch.Tensor, n: int) -> torch.Tensor:
    """Cross-entropy of each of the 2n rows of every similarity matrix ``z z^T`` (G, 2n, 2n) against
    its counterpart (row i <-> row n + i), the diagonal left out of the softmax."""
    sim = z @ z.transpose(1, 2)
    m = 2 * n
    off = ~torch.eye(m, dtype=torch.bool, device=z.device)
    logits = sim[:, off].view(sim.shape[0], m, m - 1)  # each row without its diagonal
    logp = F.log_softmax(logits, dim=-1)
    i = torch.arange(n, device=z.device)
    # column of the positive once the diagonal is dropped: for row i (< n) it is n + i - 1, for row n + i it is i
    return -(logp[:, i, n + i - 1].mean() + logp[:, n + i, i].mean()) / 2


@fp32_loss
def instance_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Eq. 3: at every timestamp, each series against the 2B - 1 other representations of the batch
    at that timestamp; its positive is the same series in the other view. Zero for a batch of one."""
    b = z1.shape[0]
    if b == 1:
        return z1.new_zeros(())
    return _pair_loss(torch.cat([z1, z2], 0).transpose(0, 1), b)


@fp32_loss
def temporal_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Eq. 2: within each series, timestamp t against the 2T - 1 other timestamps of both views; its
    positive is t in the other view. Zero for one timestamp."""
    t = z1.shape[1]
    if t == 1:
        return z1.new_zeros(())
    return _pair_loss(torch.cat([z1, z2], 1), t)


@fp32_loss
def hierarchical_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 0.5,
                                  temporal_unit: int = 0) -> torch.Tensor:
    """Algorithm 1 (see the module docstring); ``z1``, ``z2`` (B, T, D), the views' representations of
    the same timestamps."""
    if z1.shape != z2.shape or z1.dim() != 3:
        raise ValueError(f"hierarchical_contrastive_loss: views must be (B, T, D) of one shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    loss = z1.new_zeros(())
    level = 0
    while z1.shape[1] > 1:
        if alpha != 0:
            loss = loss + alpha * instance_contrastive_loss(z1, z2)
        if level >= temporal_unit and alpha != 1:
            loss = loss + (1 - alpha) * temporal_contrastive_loss(z1, z2)
        level += 1
        z1 = F.max_pool1d(z1.transpose(1, 2), kernel_size=2).transpose(1, 2)
        z2 = F.max_pool1d(z2.transpose(1, 2), kernel_size=2).transpose(1, 2)
    if alpha != 0:
        loss = loss + alpha * instance_contrastive_loss(z1, z2)
    level += 1
    return loss / level
