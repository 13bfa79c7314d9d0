"""Contrastive objectives (positives against negatives).

Every function takes the local (per-rank) tensors; where the objective needs the whole global
batch it calls ``selfsup.dist.gather`` itself, so the same code runs on one CPU process and on
many GPUs. Similarities and logits are float32 even under autocast (``fp32_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup import dist
from selfsup.losses._precision import fp32_loss

__all__ = ["nt_xent"]


@fp32_loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *, gather: bool = True) -> torch.Tensor:
    r"""NT-Xent, the normalized temperature-scaled cross entropy of SimCLR (Chen et al. 2020, eq. 1).

    For a positive pair (i, j) among the 2N augmented samples of a batch:

    .. math::
        \ell_{i,j} = -\log \frac{\exp(\mathrm{sim}(z_i, z_j)/\tau)}
                                {\sum_{k=1}^{2N} \mathbb{1}_{[k \ne i]} \exp(\mathrm{sim}(z_i, z_k)/\tau)}

    with sim the cosine similarity; the loss is the mean of ℓ over all 2N anchors (both
    directions of every pair). With several ranks, the keys are gathered from all ranks (with
    gradient), so the negatives are the whole global batch, as in the paper's TPU setup.

    Args:
        z1, z2: (n, d) projections of the two views; row i of z1 and row i of z2 are positives.
        temperature: τ > 0 (paper: 0.5 for CIFAR-10 at batch 512-1024, 0.1 for ImageNet at 4096).
    Returns: scalar loss (the mean over this rank's 2n anchors; DDP's gradient averaging then
    makes the update that of the mean over the global batch).

    Example:
        >>> z1, z2 = torch.randn(8, 128), torch.randn(8, 128)
        >>> loss = nt_xent(z1, z2, temperature=0.5)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z1 = F.normalize(z1, dim=1)  # float32 (fp32_loss): the logits are cosines / τ, with τ down to 0.1
    z2 = F.normalize(z2, dim=1)
    k1 = dist.gather(z1) if gather else z1
    k2 = dist.gather(z2) if gather else z2
    keys = torch.cat([k1, k2])  # (2N, d): all views of the global batch
    big_n = k1.shape[0]
    offset = dist.rank() * n if (gather and k1.shape[0] != n) else 0
    queries = torch.cat([z1, z2])  # (2n, d)
    logits = queries @ keys.T / temperature
    local = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([local, local + big_n])
    pos_idx = torch.cat([local + big_n, local])
    rows = torch.arange(2 * n, device=z1.device)
    logits[rows, self_idx] = float("-inf")
    return F.cross_entropy(logits, pos_idx)
