"""Momentum-contrast objectives: MoCo v1/v2's InfoNCE against a queue of keys, and MoCo v3's
symmetric in-batch contrast.

Keys come from a momentum (EMA) encoder and are targets: no gradient flows into them. Where the
objective uses the whole global batch as keys, the function gathers them across ranks itself
(``selfsup.dist.gather(grad=False)``), so one code path serves one CPU process and many GPUs.
Logits are computed in float32 even under autocast (``fp32_loss``): with τ = 0.2 a bf16 dot
product's rounding (~4e-3) would move each logit by ~0.02.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup import dist
from selfsup.losses._precision import fp32_loss

__all__ = ["moco_info_nce", "moco_v3_ctr", "moco_v3_loss"]


@fp32_loss
def moco_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    r"""InfoNCE of MoCo (He et al. 2020, eq. 1; temperature 0.2 from Chen et al. 2020, MoCo v2).

    For a query q with its positive key k+ (the other view of the same image, from the momentum
    encoder) and the K keys k_i of the queue (earlier batches' keys) as negatives:

    .. math::
        \mathcal{L}_q = -\log \frac{\exp(q \cdot k_+ / \tau)}
                                   {\exp(q \cdot k_+ / \tau) + \sum_{i=1}^{K} \exp(q \cdot k_i / \tau)}

    i.e. a (K+1)-way softmax cross entropy with logits [q·k+, q·queue] / τ and label 0, averaged
    over the batch. q and k are L2-normalized here; the queue's rows must already be unit vectors
    (MoCo stores normalized keys). No gradient reaches k or the queue.

    Args:
        q: (n, d) query projections (any scale; normalized here).
        k: (n, d) positive keys; row i is the positive of q's row i.
        queue: (K, d) unit-norm negative keys.
        temperature: τ > 0 (MoCo v1: 0.07; MoCo v2: 0.2).
    Returns: scalar loss, the mean over the n queries.

    Example:
        >>> q, k = torch.randn(4, 128), torch.randn(4, 128)
        >>> queue = F.normalize(torch.randn(4096, 128), dim=1)
        >>> loss = moco_info_nce(q, k, queue, temperature=0.2)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (n, 1)
    l_neg = q @ queue.detach().T  # (n, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


@fp32_loss
def moco_v3_ctr(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, *, gather: bool = True) -> torch.Tensor:
    r"""MoCo v3's contrastive term ctr(q, k) (Chen, Xie, He 2021, Algorithm 1).

    The keys of the whole global batch (gathered from every rank, without gradient) are the
    candidates; query i's positive is key i of the same image:

    .. math::
        \mathrm{ctr}(q, k) = 2\tau \cdot \frac{1}{n} \sum_i -\log
            \frac{\exp(q_i \cdot k_i / \tau)}{\sum_{j=1}^{N} \exp(q_i \cdot k_j / \tau)}

    with q, k L2-normalized and N the global batch. The factor 2τ is the official code's (it
    makes the gradient scale independent of τ); labels are ``arange(n) + rank * n``.

    Args:
        q: (n, d) predictor outputs of one view (this rank's part of the batch).
        k: (n, d) momentum-encoder projections of the other view of the same images.
        temperature: τ > 0 (paper: 0.2 for ViTs; the official ResNet recipe keeps 1.0).
    Returns: scalar loss (mean over this rank's n queries, times 2τ).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = q.shape[0]
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    keys = dist.gather(k, grad=False) if gather else k
    offset = dist.rank() * n if keys.shape[0] != n else 0
    logits = q @ keys.T / temperature
    labels = torch.arange(n, device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


@fp32_loss
def moco_v3_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, temperature: float = 0.2,
                 *, gather: bool = True) -> torch.Tensor:
    r"""MoCo v3's symmetrized loss: ctr(q1, k2) + ctr(q2, k1) (Chen, Xie, He 2021, Algorithm 1).

    q_v = predictor(projector(backbone(x_v))) from the base encoder, k_v = projector(backbone(x_v))
    from the momentum encoder; each view's query is contrasted against the other view's keys.

    Example:
        >>> q1, q2, k1, k2 = (torch.randn(8, 256) for _ in range(4))
        >>> loss = moco_v3_loss(q1, q2, k1, k2, temperature=0.2)
    """
    return moco_v3_ctr(q1, k2, temperature, gather=gather) + moco_v3_ctr(q2, k1, temperature, gather=gather)
