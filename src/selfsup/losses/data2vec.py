"""data2vec targets and regression loss (Baevski, Hsu, Xu, Babu, Gu, Auli 2022, "data2vec: A
General Framework for Self-supervised Learning in Speech, Vision and Language", ICML; and
Baevski, Babu, Hsu, Auli 2023, "Efficient Self-supervised Learning with Contextualized Target
Representations for Vision, Speech and Language", ICML — data2vec 2.0).

The teacher's targets are contextualized: the average of its top-K blocks' outputs, each
normalized, for every token of the unmasked input (data2vec sec. 3.3, eq. 1-2):

    ŷ_t = 1/K Σ_{l=L-K+1}^{L} IN(a_t^l),      y_t = LN(ŷ_t)   (data2vec 2.0 images: IN, then LN)

with IN an instance norm of each channel over the token dimension (per sample, no affine) and
LN a layer norm of each token over channels (no affine). The student regresses them with an
L2 loss scaled by 1/sqrt(D) (official ``d2v_loss``; ``loss_scale=None``). Both are pure
functions here; ``methods/data2vec2.py`` builds the teacher and the decoder around them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from selfsup.losses._precision import autocast_off, fp32_loss

__all__ = ["data2vec_targets", "data2vec_loss"]


@torch.no_grad()
def data2vec_targets(layers: Sequence[torch.Tensor], top_k: int, *, instance_norm_layers: bool = True,
                     layer_norm_layers: bool = False, layer_norm_targets: bool = True,
                     instance_norm_targets: bool = False) -> torch.Tensor:
    r"""Average of the top-``top_k`` layer outputs, normalized as the official ``make_targets``:

    .. math::
        y = \mathrm{LN}\Big(\frac{1}{K}\sum_{l > L-K} \mathrm{IN}(a^l)\Big)

    Per layer: instance norm over tokens (``F.instance_norm`` on (B, D, T): each sample's each
    channel gets zero mean and unit variance over its T tokens, eps 1e-5) and/or layer norm over
    channels; then the mean over the K layers; then layer norm over channels (``layer_norm_targets``)
    and/or instance norm over tokens (``instance_norm_targets``). Every norm has no affine
    parameters. data2vec 2.0's image recipes turn on ``instance_norm_layers`` and
    ``layer_norm_targets`` only (the defaults here).

    Args:
        layers: the L layer outputs, each (B, T, D), bottom first (extra tokens such as CLS removed).
        top_k: K, how many of the last layers to average (all of them if K >= L).
    Returns: (B, T, D) float32 targets, without gradient.

    Example:
        >>> layers = [torch.randn(2, 16, 32) for _ in range(4)]
        >>> y = data2vec_targets(layers, top_k=3)   # (2, 16, 32)
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    # not fp32_loss: only the top K of the L layers are cast to float32
    with autocast_off(layers[-1]):
        chosen = [t.float() for t in layers[-top_k:]]
        if instance_norm_layers:
            chosen = [F.instance_norm(t.transpose(1, 2)).transpose(1, 2) for t in chosen]
        if layer_norm_layers:
            chosen = [F.layer_norm(t, t.shape[-1:]) for t in chosen]
        y = torch.stack(chosen).mean(dim=0)
        if layer_norm_targets:
            y = F.layer_norm(y, y.shape[-1:])
        if instance_norm_targets:
            y = F.instance_norm(y.transpose(1, 2)).transpose(1, 2)
        return y


@fp32_loss
def data2vec_loss(pred: torch.Tensor, target: torch.Tensor, *, scale: float | None = None,
                  beta: float = 0.0) -> torch.Tensor:
    r"""data2vec 2.0's regression loss, as the official ``d2v_loss`` plus its reduction:

    .. math::
        \mathcal{L} = \frac{1}{n}\sum_{i=1}^{n} s\,\lVert f(x)_i - y_i \rVert_2^2,
        \qquad s = 1/\sqrt{D}\ \text{(default)}

    The official model returns the element-wise squared errors times ``s`` and the criterion sums
    them and divides by the sample size, the number of masked tokens n (over all clones): so this
    is a mean over tokens of a sum over channels, not ``F.mse_loss``'s mean over elements (which
    would be ``sqrt(D)`` times smaller). With ``beta > 0`` the squared error is replaced by
    smooth-L1 with that beta (official ``loss_beta``; 0 in every data2vec 2.0 recipe).

    Args:
        pred: (n, D) or (..., D) student predictions for the masked tokens.
        target: the same shape, the teacher's targets (detached here).
        scale: s; None means 1/sqrt(D) (official ``loss_scale: null``).
        beta: smooth-L1 beta; 0 means the L2 loss.
    Returns: scalar, float32.

    Example:
        >>> p, y = torch.randn(40, 768), torch.randn(40, 768)
        >>> loss = data2vec_loss(p, y)   # about 2 * sqrt(768) for independent unit-variance inputs
    """
    d = pred.shape[-1]
    p = pred.reshape(-1, d)
    y = target.reshape(-1, d).detach()
    if beta == 0:
        err = (p - y).pow(2)
    else:
        err = F.smooth_l1_loss(p, y, reduction="none", beta=beta)
    s = 1.0 / math.sqrt(d) if scale is None else scale
    return err.sum() * s / max(p.shape[0], 1)
