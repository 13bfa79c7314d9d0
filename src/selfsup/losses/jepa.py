"""Joint-embedding predictive objectives: a predictor regresses, in representation space, the
stop-gradient features that a target encoder gives to regions the context did not see (I-JEPA).

Unlike the two-view regression losses in ``regression.py`` these are per token and unnormalized:
the targets carry their own scale (I-JEPA layer-norms them without an affine map, so every token
has mean 0 and variance 1 over its features) and the loss compares raw values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from selfsup.losses._precision import fp32_loss

__all__ = ["ijepa_loss", "jepa_l1_loss"]


@fp32_loss
def ijepa_loss(pred: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor], *,
               beta: float = 1.0) -> torch.Tensor:
    r"""I-JEPA's prediction loss (Assran et al. 2023, eq. 1, with the official code's smooth-L1):

    .. math::
        \mathcal{L} = \frac{1}{M} \sum_{i=1}^{M} \frac{1}{|B_i|\,d} \sum_{j \in B_i} \sum_{k=1}^{d}
                      \ell_\beta\big(\hat s_{y_j,k} - s_{y_j,k}\big),\qquad
        \ell_\beta(u) = \begin{cases} \tfrac12 u^2/\beta & |u| < \beta \\ |u| - \tfrac12\beta & \text{else}
                        \end{cases}

    over the M target blocks B_i (the paper writes the squared L2 distance; the official
    ``train.py`` uses ``F.smooth_l1_loss(z, h)`` with the default β = 1, i.e. the Huber loss).
    The official loss is the plain mean over every element of the predictions stacked along the
    batch (blocks x images x tokens x features); since every block of a batch has the same
    number of tokens (masks are cut to the shortest), that is the mean over blocks above.
    The target side gets no gradient.

    Args:
        pred: (..., d) predicted target-token features, or a list of such tensors (one per block,
            all the same shape: they are concatenated).
        target: same shape(s); the target encoder's layer-normed features of the same tokens.
        beta: the smooth-L1 threshold (1.0 as ``F.smooth_l1_loss``'s default).
    Returns: a float32 scalar (computed in float32 even under autocast).

    Example:
        >>> p, h = torch.randn(4 * 8, 12, 192), torch.randn(4 * 8, 12, 192)
        >>> loss = ijepa_loss(p, h)
    """
    if not torch.is_tensor(pred):
        pred, target = torch.cat(list(pred)), torch.cat(list(target))
    if pred.shape != target.shape:
        raise ValueError(f"ijepa_loss: predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ")
    return F.smooth_l1_loss(pred, target.detach(), beta=beta)


@fp32_loss
def jepa_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""The L1 prediction loss of TS-JEPA (Ennadir, Golkar, Sarra 2024, the official ``loss_pred``) and
    V-JEPA (Bardes et al. 2024, eq. 1): the mean absolute difference between the predicted and the
    target features over every predicted token and feature,

    .. math:: \mathcal{L} = \frac{1}{K\,d} \sum_{j=1}^{K} \sum_{k=1}^{d} \big|\hat s_{j,k} - s_{j,k}\big|

    with the target side's gradient stopped (the targets are the EMA encoder's layer-normed tokens).

    Args:
        pred: (..., d) predicted features of the hidden tokens.
        target: the same shape; the target encoder's features of the same tokens.
    Returns: a float32 scalar (computed in float32 even under autocast).

    Example:
        >>> p, h = torch.randn(8, 7, 128), torch.randn(8, 7, 128)
        >>> loss = jepa_l1_loss(p, h)
    """
    if pred.shape != target.shape:
        raise ValueError(f"jepa_l1_loss: predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ")
    return (pred - target.detach()).abs().mean()
