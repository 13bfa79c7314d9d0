"""Regression objectives: a prediction of one view regresses onto a stop-gradient target from the
other view, with no negatives (BYOL, SimSiam).

Both papers' objectives are the same up to an affine map, since for unit vectors
``||p̄ - z̄||² = 2 - 2 cos(p, z)``: BYOL writes the normalized MSE, SimSiam the negative cosine.
They are purely per-sample, so nothing crosses ranks: each rank's mean is the local loss and DDP's
gradient averaging makes the update that of the global mean.

The target side is detached inside every function (``stop_grad=True``), as both papers define
the loss on ``stopgrad(z)``; pass ``stop_grad=False`` only to reproduce SimSiam's "w/o stop-grad"
collapse ablation (Chen & He 2021, fig. 2). Everything is computed in float32, even under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses._precision import fp32_loss

__all__ = ["normalized_mse", "negative_cosine", "byol_loss", "simsiam_loss"]


def _cosine(p: torch.Tensor, z: torch.Tensor, stop_grad: bool) -> torch.Tensor:
    """Row-wise cosine similarity (float32 under autocast too: every caller is ``fp32_loss``)."""
    if stop_grad:
        z = z.detach()
    return (F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(dim=-1)


@fp32_loss
def normalized_mse(p: torch.Tensor, z: torch.Tensor, *, stop_grad: bool = True) -> torch.Tensor:
    r"""BYOL's regression loss (Grill et al. 2020, eq. 2) for one direction:

    .. math::
        \mathcal{L}_{\theta,\xi} = \left\lVert \bar q_\theta(z_\theta) - \bar z'_\xi \right\rVert_2^2
                                 = 2 - 2\,\frac{\langle q_\theta(z_\theta), z'_\xi \rangle}
                                              {\lVert q_\theta(z_\theta)\rVert_2 \, \lVert z'_\xi \rVert_2}

    with :math:`\bar x = x / \lVert x \rVert_2`. Ranges over [0, 4]: 0 for aligned vectors, 2 for
    orthogonal ones, 4 for opposite ones; invariant to the scale of either input.

    Args:
        p: (n, d) online predictions :math:`q_\theta(z_\theta)`.
        z: (n, d) target projections :math:`z'_\xi` (detached unless ``stop_grad=False``).
    Returns: scalar, the mean over the n rows.

    Example:
        >>> q, z = torch.randn(8, 256), torch.randn(8, 256)
        >>> loss = normalized_mse(q, z)
    """
    return (2.0 - 2.0 * _cosine(p, z, stop_grad)).mean()


@fp32_loss
def negative_cosine(p: torch.Tensor, z: torch.Tensor, *, stop_grad: bool = True) -> torch.Tensor:
    r"""SimSiam's :math:`\mathcal{D}(p, \mathrm{stopgrad}(z))` (Chen & He 2021, eqs. 1 and 3):

    .. math::
        \mathcal{D}(p, z) = -\frac{p}{\lVert p \rVert_2} \cdot \frac{z}{\lVert z \rVert_2}

    Ranges over [-1, 1]; its minimum -1 is reached when p and z are aligned.

    Args:
        p: (n, d) predictions h(f(x)).
        z: (n, d) projections f(x) of the other view (detached unless ``stop_grad=False``).
    Returns: scalar, the mean over the n rows.
    """
    return -_cosine(p, z, stop_grad).mean()


@fp32_loss
def byol_loss(q1: torch.Tensor, q2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, *,
              stop_grad: bool = True) -> torch.Tensor:
    r"""BYOL's symmetrized loss :math:`\mathcal{L}^{BYOL} = \mathcal{L} + \tilde{\mathcal{L}}`
    (Grill et al. 2020, sec. 3.1): the prediction of each view regresses onto the target
    projection of the other, and the two directions are summed (not averaged), as in the paper
    and its official code, so the loss ranges over [0, 8].

    Args:
        q1, q2: (n, d) online predictions of views 1 and 2.
        z1, z2: (n, d) target-network projections of views 1 and 2.
    """
    return normalized_mse(q1, z2, stop_grad=stop_grad) + normalized_mse(q2, z1, stop_grad=stop_grad)


@fp32_loss
def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, *,
                 stop_grad: bool = True) -> torch.Tensor:
    r"""SimSiam's symmetrized loss (Chen & He 2021, eq. 4):

    .. math::
        \mathcal{L} = \tfrac12 \mathcal{D}(p_1, \mathrm{stopgrad}(z_2))
                    + \tfrac12 \mathcal{D}(p_2, \mathrm{stopgrad}(z_1))

    averaged over the images; its minimum is -1. The encoder of view 2 gets no gradient through
    z2 in the first term, only through p2 in the second (and vice versa).

    Args:
        p1, p2: (n, d) predictor outputs of views 1 and 2.
        z1, z2: (n, d) projector outputs of views 1 and 2.
    """
    return 0.5 * negative_cosine(p1, z2, stop_grad=stop_grad) + 0.5 * negative_cosine(p2, z1, stop_grad=stop_grad)
