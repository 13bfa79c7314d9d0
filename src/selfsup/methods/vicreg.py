"""VICReg (Bardes, Ponce, LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR).

Two views of each image go through one encoder and an expander MLP, giving embeddings Z and Z'
(n x d). Three terms, each on the embeddings directly (no normalization, no negatives):

    s(Z, Z') = mean_{b,j} (z_bj - z'_bj)^2                                       invariance
    v(Z)     = (1/d) sum_j max(0, γ - sqrt(Var(z^j) + ε))                          variance
    c(Z)     = (1/d) sum_{i != j} Cov(Z)_ij^2,  Cov(Z) = (Z - Z̄)^T (Z - Z̄) / (n - 1)   covariance
    ℓ        = λ s(Z, Z') + μ [v(Z) + v(Z')] / 2 + ν [c(Z) + c(Z')]

The variance hinge keeps every dimension's std at least γ (no collapse); the covariance term
decorrelates the dimensions. v and c are computed on the embeddings gathered from all ranks (with
gradient), s on each rank's own samples, as the official code does. The branch combination
(v averaged, c summed) and the invariance as a mean over all n x d entries are the official
code's; the paper writes sums, and its coefficients are tuned with the code's form.

Paper defaults (ImageNet, sec. 4.1 and appendix C; official code): ResNet-50 (zero-initialized
last BN scale of each residual block); expander of 3 linear layers of 8192 units, BN + ReLU after
the first two (hidden linears with bias, the last without); λ = 25, μ = 25, ν = 1, γ = 1,
ε = 1e-4; LARS (trust coefficient 1e-3, momentum 0.9; biases and BN excluded from weight decay and
adaptation), batch 2048, lr 0.2 x batch/256 for all parameters, 10 warm-up epochs then cosine
decay to 1/1000 of the peak, weight decay 1e-6, 1000 epochs, SyncBatchNorm; BYOL's asymmetric
views (blur p 1.0 / 0.1, solarize p 0.0 / 0.2). Downstream tasks use the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.heads import mlp
from selfsup.losses import vicreg_terms
from selfsup.modalities.views import ViewMethod
from selfsup.registry import register_method


@dataclass
class VICRegConfig(MethodConfig):
    name: str = "vicreg"
    sim_coeff: float = 25.0  # λ, invariance
    std_coeff: float = 25.0  # μ, variance
    cov_coeff: float = 1.0  # ν, covariance
    gamma: float = 1.0  # target std of every dimension
    eps: float = 1e-4
    proj_hidden_dim: int = 8192
    proj_dim: int = 8192
    proj_layers: int = 3
    min_batch_size = 2  # variance and covariance need two samples

    def validate(self) -> None:
        for key in ("sim_coeff", "std_coeff", "cov_coeff"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must be >= 0")
        if self.gamma <= 0:
            raise ConfigError(f"method.gamma={self.gamma}: must be > 0")
        if self.eps <= 0:
            raise ConfigError(f"method.eps={self.eps}: must be > 0")
        if min(self.proj_hidden_dim, self.proj_dim) < 1 or self.proj_layers < 1:
            raise ConfigError("method.proj_dim, proj_hidden_dim and proj_layers must be >= 1")


@register_method
class VICReg(ViewMethod):
    name = "vicreg"
    paper = "Bardes, Ponce & LeCun 2022, VICReg: Variance-Invariance-Covariance Regularization for " \
            "Self-Supervised Learning"
    family = "redundancy"
    Config = VICRegConfig

    def __init__(self, cfg: VICRegConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        self.require_two_views()
        # Linear -> BN -> ReLU on hidden layers, a bias-free output Linear (official code). The
        # hidden linears keep their bias there; mlp() drops it as BN's shift makes it redundant.
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, bias_last=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        x1, x2 = self.make_views(batch)
        # one pass per view, as the official code: the backbone's BN statistics are per view
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        c = self.cfg
        inv, var, cov = vicreg_terms(z1, z2, c.gamma, c.eps)
        loss = c.sim_coeff * inv + c.std_coeff * var + c.cov_coeff * cov
        metrics = {"vicreg/invariance": inv.detach(), "vicreg/variance": var.detach(),
                   "vicreg/covariance": cov.detach()}
        return StepOutput(loss=loss, metrics=metrics, embeddings=z1.detach())
