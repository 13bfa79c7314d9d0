"""RotNet (Gidaris, Singh, Komodakis 2018, "Unsupervised Representation Learning by Predicting
Image Rotations", ICLR).

Every image x of the batch is rotated by y x 90 degrees for all four y in {0, 1, 2, 3}
(``torch.rot90(x, y, dims=(H, W))``, counter-clockwise, the official code's ``rotate_img``
convention) and the encoder F with a classification head predicts y (eqs. 1-3):

    loss(X) = 1/N Σ_i 1/4 Σ_y -log F^y(g(X_i | y)),

the cross-entropy over the 4N rotated images. Feeding all four rotations of each image in the
same batch (instead of one random rotation) is what the paper found best (sec. 3.1, "the
network sees 4 times more images than the batch size"); ``all_rotations=false`` gives the
one-random-rotation variant. The head is linear on the pooled backbone features (as the VISSL
ResNet-50 RotNet, 2048 -> 4), or a BN-ReLU MLP with ``head_hidden_dim > 0``. Downstream uses the
backbone features of the upright image; ``rot_acc`` logs the pretext accuracy.

Paper defaults: views are only a random crop and a horizontal flip (no colour augmentation):
on CIFAR-10 a 32-px random crop with 4-px padding, on ImageNet a random-resized 224 crop (the
official ``random_sized_crop`` data option). CIFAR-10 (NIN, sec. 3.1): SGD momentum 0.9 (Nesterov
in the official code), weight decay 5e-4, batch 128 images (x4 rotations), lr 0.1 divided by 5
after epochs 30, 60 and 80 of 100. ImageNet (AlexNet): SGD momentum 0.9, weight decay 5e-4, batch
192 images (x4), lr 0.01 (the official ImageNet_RotNet_AlexNet.py declares 0.1 but its per-epoch
table overrides it with 0.01 from epoch 0) divided by 10 after epochs 10 and 20 of 30. The
recipes say how the ResNet versions depart from this (configs/rotation/*.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.heads import mlp
from selfsup.losses import classification_loss
from selfsup.modalities.image import ImageMethod
from selfsup.registry import register_method

N_ROTATIONS = 4


def rotate_batch(x: torch.Tensor, all_rotations: bool = True,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated images and their labels from a square ``(N, C, S, S)`` batch.

    ``all_rotations``: ``(4N, C, S, S)``, the whole batch rotated by 0, 90, 180 and 270 degrees
    counter-clockwise, in that order (rows ``y*N + i`` hold image i rotated by y x 90 degrees);
    labels ``[0]*N + [1]*N + [2]*N + [3]*N``. Otherwise one uniformly drawn rotation per image:
    ``(N, C, S, S)`` and its (N,) labels.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(x.shape[-2:])}")
    n = x.shape[0]
    rotated = [torch.rot90(x, k, dims=(-2, -1)) for k in range(N_ROTATIONS)]
    if all_rotations:
        labels = torch.arange(N_ROTATIONS, device=x.device).repeat_interleave(n)
        return torch.cat(rotated), labels
    labels = torch.randint(0, N_ROTATIONS, (n,), generator=generator, device=x.device)
    stacked = torch.stack(rotated)  # (4, N, C, S, S): pick rotation labels[i] for image i
    return stacked[labels, torch.arange(n, device=x.device)], labels


@dataclass
class RotationConfig(MethodConfig):
    """Only ``augment.views[0]`` is used (one base view per image; any further views are ignored)."""

    name: str = "rotation"
    all_rotations: bool = True  # all 4 rotations of every image in the batch (paper's best)
    head_hidden_dim: int = 0  # 0: linear head on the backbone features; > 0: Linear-BN-ReLU-Linear

    def validate(self) -> None:
        if self.head_hidden_dim < 0:
            raise ConfigError(f"method.head_hidden_dim={self.head_hidden_dim}: must be >= 0 (0 = linear head)")


@register_method
class Rotation(ImageMethod):
    name = "rotation"
    paper = "Gidaris et al. 2018, Unsupervised Representation Learning by Predicting Image Rotations"
    family = "pretext"
    Config = RotationConfig
    single_view = True

    def __init__(self, cfg: RotationConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        dim = backbone.out_dim
        if cfg.head_hidden_dim > 0:
            self.head = mlp(dim, cfg.head_hidden_dim, N_ROTATIONS, 2)
        else:
            self.head = torch.nn.Linear(dim, N_ROTATIONS)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        (x,) = self.make_views(batch)  # crop + flip: the base view, before rotating
        n = x.shape[0]
        rotated, labels = rotate_batch(x, self.cfg.all_rotations)
        feats = self.backbone(self.layout(rotated))  # one pass over all 4N images
        loss, acc = classification_loss(self.head(feats), labels)
        # the monitor watches the upright images (with one rotation each: the N rotated ones)
        return StepOutput(loss=loss, metrics={"rot_acc": acc}, embeddings=feats[:n].detach())
