"""Language-model losses: next-token prediction (GPT; Radford et al. 2018, 2019), masked-token
prediction (BERT; Devlin et al. 2019) and T5's target-sequence prediction (Raffel et al. 2020)
are one cross-entropy over the vocabulary at the positions that carry a target:

    L = -1/|T| Σ_{t ∈ T} log softmax(z_t)[y_t],   T = {t : y_t != -100}

(``-100``, PyTorch's ``ignore_index``, marks positions without a target: unmasked tokens in MLM,
padding). The softmax over tens of thousands of tokens runs in float32 (``fp32_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses._precision import fp32_loss

IGNORE = -100

__all__ = ["token_cross_entropy"]


@fp32_loss
def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over the target positions, top-1 accuracy there (detached)).

    Args:
        logits: (..., V) scores over the vocabulary.
        targets: (...) int64 token ids, ``-100`` where there is no target.
    Returns a zero loss (with a gradient path) and zero accuracy when no position has a target.

    Example:
        >>> logits = torch.zeros(1, 2, 4); logits[0, 0, 3] = 10.0
        >>> loss, acc = token_cross_entropy(logits, torch.tensor([[3, -100]]))   # loss ~ 1.4e-4, acc 1
    """
    flat, y = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    keep = y != IGNORE
    if not bool(keep.any()):
        return flat.sum() * 0.0, flat.new_zeros(())
    loss = F.cross_entropy(flat, y, ignore_index=IGNORE)
    acc = (flat.detach()[keep].argmax(-1) == y[keep]).float().mean()
    return loss, acc
