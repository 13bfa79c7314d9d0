"""Masked image modeling with discrete targets: predict the visual token of each hidden patch (BEiT).

A pure function of logits and token ids. Computed in float32 even under autocast (``fp32_loss``);
a mean over the local batch's masked patches, so nothing crosses ranks (DDP averages the
gradients, as the official code's per-GPU ``CrossEntropyLoss`` does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses._precision import fp32_loss

__all__ = ["beit_loss"]


@fp32_loss
def beit_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""BEiT's masked image modeling loss (Bao et al. 2022, eq. 1; official
    ``engine_for_pretraining.py``): the cross-entropy of the visual token of every **masked**
    patch under the softmax over the vocabulary, averaged over all masked patches of the batch
    (unmasked patches do not count):

    .. math::
        \mathcal{L} = -\frac{1}{\sum_{b,i} m_{b,i}} \sum_{b,i} m_{b,i}
                      \log \frac{\exp(\ell_{b,i,z_{b,i}})}{\sum_{v=1}^{V} \exp(\ell_{b,i,v})}

    with :math:`\ell_{b,i}` the logits predicted for patch i of image b, :math:`z_{b,i}` the
    tokenizer's id of that patch in the unmasked image and :math:`m_{b,i} = 1` for masked patches.

    Args:
        logits: ``(B, N, V)`` logits for every patch together with ``mask``, or ``(M, V)`` logits
            of the masked patches only (the official ``lm_head(x[bool_masked_pos])``; ``mask=None``).
        targets: token ids ``(B, N)`` (with ``mask``) or ``(M,)``, long, in ``[0, V)``.
        mask: ``(B, N)`` bool, True = masked (counts in the loss).

    Returns:
        Scalar float32 loss. Example: two masked patches with logits ``[ln 3, 0]`` (target 0) and
        ``[0, 0]`` (target 1) give ``(-ln(3/4) + ln 2) / 2 ≈ 0.4904``.
    """
    if mask is not None:
        if logits.shape[:2] != mask.shape or targets.shape != mask.shape:
            raise ValueError(f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and mask "
                             f"{tuple(mask.shape)} must agree on (B, N)")
        logits, targets = logits[mask], targets[mask]
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (M, V) and targets (M,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    return F.cross_entropy(logits, targets.long())
