"""TS2Vec (Yue, Wang, Duan, Yang, Huang, Tong, Xu 2022, "TS2Vec: Towards Universal Representation of
Time Series", AAAI; official ``ts2vec.py``).

Contextual consistency: two views of the same timestamps, seen in different contexts, should get the
same representation. Per batch of series x (B, C, T) (sec. 3.2, the official ``fit``):

1. random cropping: a segment length l ~ U{2, ..., T} and its place [a, a + l) are drawn; the first
   view is the segment [a1, a + l) and the second [a, b2), with a1 ~ U{0..a} and b2 ~ U{a + l..T}, so
   both contain [a, a + l) (the overlap) with different context; each series of the batch is shifted
   by its own random offset (within the series). One draw of (l, a, a1, b2) per batch, as the
   official code;
2. timestamp masking: after the encoder's input projection, each timestamp of each view is zeroed
   with probability 1/2 (``backbone: ts2vec``, the dilated convolutional encoder);
3. the representations of the overlap in the two views, (B, l, 320) each, enter the hierarchical
   contrastive loss (``losses.hierarchical_contrastive_loss``: instance-wise and temporal contrast
   at every max-pooling scale, alpha = 0.5).

The encoder used downstream is the running average of the trained encoder's weights over every step
(the official ``torch.optim.swa_utils.AveragedModel``, updated after each step, starting from the
initial weights): ``encode`` and ``selfsup export`` read it. Features for classification: the
timestamps' representations max-pooled over the whole series (the official
``encoding_window='full_series'``); for forecasting: the representation of the window's last step.

Defaults (official ``train.py`` / ``ts2vec.py``): representation 320 wide, hidden 64, 10 residual
blocks, kernel 3, AdamW lr 1e-3 (weight decay 0.01, torch's default), batch 16, 200 iterations for
a set of at most 100,000 values (600 otherwise), training series cropped to ``max_train_length``
3,000 (here: ``data.seq_len`` windows of a long series). Classification protocol: an RBF SVM on the
instance representations (here: the shared kNN / logistic-regression probes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from selfsup.core.method import MethodConfig, Progress, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import hierarchical_contrastive_loss
from selfsup.modalities.series import SeriesMethod
from selfsup.registry import register_method


@dataclass
class TS2VecConfig(MethodConfig):
    name: str = "ts2vec"
    alpha: float = 0.5  # weight of the instance-wise loss (temporal: 1 - alpha)
    temporal_unit: int = 0  # first pooling level with the temporal loss
    mask_prob: float = 0.5  # probability a timestamp is masked (the official binomial mask)
    average: bool = True  # encode with the running average of the weights (the official AveragedModel)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"method.alpha={self.alpha}: must be in [0, 1]")
        if self.temporal_unit < 0:
            raise ConfigError(f"method.temporal_unit={self.temporal_unit}: must be >= 0")
        if not 0.0 <= self.mask_prob < 1.0:
            raise ConfigError(f"method.mask_prob={self.mask_prob}: must be in [0, 1)")


def take_per_row(x: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """(B, C, length): series b's steps start[b] .. start[b] + length - 1 of x (B, C, T)."""
    idx = start[:, None] + torch.arange(length, device=x.device)
    return x.gather(2, idx[:, None, :].expand(-1, x.shape[1], -1))


def draw_crops(batch: int, length: int, temporal_unit: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """The official random cropping: (starts of view 1 (B,), starts of view 2 (B,), view 1 length,
    view 2 length, overlap length l). View 1 ends with the overlap, view 2 starts with it."""
    def randint(low: int, high: int) -> int:  # high exclusive, as numpy's
        return int(torch.randint(low, high, ()))

    crop_l = randint(2 ** (temporal_unit + 1), length + 1)
    crop_left = randint(0, length - crop_l + 1)
    crop_right = crop_left + crop_l
    crop_eleft = randint(0, crop_left + 1)
    crop_eright = randint(crop_right, length + 1)
    offset = torch.randint(-crop_eleft, length - crop_eright + 1, (batch,), device=device)
    return offset + crop_eleft, offset + crop_left, crop_right - crop_eleft, crop_eright - crop_left, crop_l


@register_method
class TS2Vec(SeriesMethod):
    name = "ts2vec"
    paper = "Yue et al. 2022, TS2Vec: Towards Universal Representation of Time Series"
    family = "contrastive"
    Config = TS2VecConfig

    def __init__(self, cfg: TS2VecConfig, backbone: nn.Module, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        from selfsup.backbones.series import TSEncoder

        if not isinstance(backbone, TSEncoder):
            raise ConfigError(f"ts2vec trains its dilated convolutional encoder (backbone.name=ts2vec), got "
                              f"{type(backbone).__name__}")
        self.average = copy.deepcopy(backbone).requires_grad_(False)
        self.register_buffer("n_averaged", torch.ones((), dtype=torch.long))

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.average, self.backbone)]

    def export_backbone(self) -> nn.Module:
        return self.average if self.cfg.average else self.backbone

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> StepOutput:
        x = self.preprocess(batch)
        b, _, t = x.shape
        if t < 2 ** (self.cfg.temporal_unit + 1):
            raise ConfigError(f"ts2vec: series of {t} steps are too short to crop (method.temporal_unit="
                              f"{self.cfg.temporal_unit} needs {2 ** (self.cfg.temporal_unit + 1)})")
        start1, start2, len1, len2, overlap = draw_crops(b, t, self.cfg.temporal_unit, x.device)
        keep1 = torch.rand(b, len1, device=x.device) >= self.cfg.mask_prob
        keep2 = torch.rand(b, len2, device=x.device) >= self.cfg.mask_prob
        out1 = self.backbone.timesteps(take_per_row(x, start1, len1), keep1)[:, -overlap:]
        out2 = self.backbone.timesteps(take_per_row(x, start2, len2), keep2)[:, :overlap]
        loss = hierarchical_contrastive_loss(out1, out2, alpha=self.cfg.alpha, temporal_unit=self.cfg.temporal_unit)
        return StepOutput(loss, {"overlap": overlap}, embeddings=out1.detach().amax(1))

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        super().on_step_end(progress)
        weight = 1.0 / (self.n_averaged + 1)  # a device tensor: no host sync on the step's hot path
        for avg, cur in zip(self.average.parameters(), self.backbone.parameters()):
            avg.add_((cur.detach() - avg) * weight)
        self.n_averaged += 1
