"""Pretext-task classification (rotation: Gidaris et al. 2018; jigsaw: Noroozi & Favaro 2016):
the network predicts which transformation of a fixed set was applied."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses._precision import fp32_loss


@fp32_loss
def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy -log softmax(logits)[label] and the top-1 accuracy (detached)."""
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, acc


__all__ = ["classification_loss"]
