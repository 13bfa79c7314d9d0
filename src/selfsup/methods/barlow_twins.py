"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny 2021, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML).

Two distorted views of each image go through one network (backbone + projector), giving z^A and
z^B. Each view's embeddings are standardized along the batch (an affine-free BatchNorm), and the
cross-correlation matrix of the two views is pushed towards the identity (eqs. 1-2):

    C_ij = (1/N) sum_b ẑ^A_bi ẑ^B_bj
    L_BT = sum_i (1 - C_ii)^2 + λ sum_i sum_{j != i} C_ij^2

The diagonal term makes the embedding invariant to the distortions; the off-diagonal term
decorrelates its dimensions, so the information is spread over them instead of collapsing. C is
computed over the GLOBAL batch (the official code all-reduces it over GPUs; see
``selfsup.losses.redundancy`` for the gradients). Downstream tasks use the backbone.

Paper defaults (ImageNet, sec. 4 and the official code): ResNet-50 (zero-initialized last BN scale
of each residual block); projector of 3 linear layers of 8192 units, BN + ReLU after the first
two, the last linear without bias; λ = 5e-3 in the paper, 0.0051 in the official code (used here);
LARS (trust coefficient 1e-3, momentum 0.9; biases and BN parameters excluded from weight decay
and adaptation), batch 2048, lr 0.2 x batch/256 for weights and 0.0048 x batch/256 for biases and
BN parameters, 10 warm-up epochs then cosine decay by a factor 1000, weight decay 1.5e-6 (the
released code defaults to 1e-6), 1000 epochs, SyncBatchNorm; BYOL's asymmetric views (blur
p 1.0 / 0.1, solarize p 0.0 / 0.2, colour jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale p 0.2).
``lambd: "1/d"`` sets λ = 1/proj_dim (Tsai et al. 2021, "A Note on Connecting Barlow Twins with
Negative-Sample-Free Contrastive Learning"), a scale-free choice for other projector widths.

The separate bias/BN learning rate is ``optim.bias_norm_lr_scale: 0.024`` (0.0048 / 0.2) in the
ImageNet recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.heads import mlp
from selfsup.losses import barlow_twins_terms, cross_correlation
from selfsup.modalities.views import ViewMethod
from selfsup.registry import register_method


@dataclass
class BarlowTwinsConfig(MethodConfig):
    name: str = "barlow_twins"
    lambd: float | str = 0.0051  # weight of the off-diagonal terms, or "1/d" for 1 / proj_dim
    proj_hidden_dim: int = 8192
    proj_dim: int = 8192
    proj_layers: int = 3
    min_batch_size = 2  # the batch standardization needs two samples

    def validate(self) -> None:
        if isinstance(self.lambd, str):
            if self.lambd.replace(" ", "") != "1/d":
                raise ConfigError(f"method.lambd={self.lambd!r}: must be a number >= 0 or '1/d'")
        elif self.lambd < 0:
            raise ConfigError(f"method.lambd={self.lambd}: must be >= 0")
        if min(self.proj_hidden_dim, self.proj_dim) < 1 or self.proj_layers < 1:
            raise ConfigError("method.proj_dim, proj_hidden_dim and proj_layers must be >= 1")

    @property
    def lambd_value(self) -> float:
        return 1.0 / self.proj_dim if isinstance(self.lambd, str) else float(self.lambd)


@register_method
class BarlowTwins(ViewMethod):
    name = "barlow_twins"
    paper = "Zbontar et al. 2021, Barlow Twins: Self-Supervised Learning via Redundancy Reduction"
    family = "redundancy"
    Config = BarlowTwinsConfig

    def __init__(self, cfg: BarlowTwinsConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        self.require_two_views()
        # Linear (no bias) -> BN -> ReLU on hidden layers; the output Linear has no bias either
        # (official code). The affine-free output BN is done inside the loss, over the global batch.
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, bias_last=False)
        self.lambd = cfg.lambd_value

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        x1, x2 = self.make_views(batch)
        # one pass per view, as the official code: the backbone's BN statistics are per view
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        c = cross_correlation(z1, z2)
        on_diag, off_diag = barlow_twins_terms(c)
        loss = on_diag + self.lambd * off_diag
        metrics = {"bt/on_diag": on_diag.detach(), "bt/off_diag": off_diag.detach()}
        return StepOutput(loss=loss, metrics=metrics, embeddings=z1.detach())
