"""BYOL (Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Pires, Guo, Azar, Piot,
Kavukcuoglu, Munos, Valko 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning", NeurIPS).

An online network (encoder f_θ, projector g_θ, predictor q_θ) learns to predict, from one view,
the target network's projection of the other view. The target (f_ξ, g_ξ) gets no gradient; after
every optimizer step it follows the online weights by an exponential moving average

    ξ <- τ ξ + (1 - τ) θ,   τ_k = 1 - (1 - τ_base) (cos(π k / K) + 1) / 2

(k the update index from 0, K the total number of steps: τ rises from τ_base to 1, sec. 3.2).
With q̄ = q_θ(g_θ(f_θ(v))) / ||.||₂ and z̄' = g_ξ(f_ξ(v')) / ||.||₂ the loss for one direction is
||q̄ - z̄'||² = 2 - 2 cos(q, z') (eq. 2); it is symmetrized by feeding v' to the online network
and v to the target, and the two directions are summed: L = L(v, v') + L(v', v). Downstream
tasks use the online encoder f_θ.

Paper defaults (ImageNet, sec. 3.3 and the official configs): ResNet-50; projector and predictor
are Linear(4096) -> BN -> ReLU -> Linear(256) (the output layer has no bias); τ_base = 0.996 for
1000 epochs (0.99 for 300); LARS with lr = 0.2 x batch/256 (0.3 for 300 epochs), weight decay
1.5e-6 (1e-6 for 300 epochs), trust coefficient 1e-3, biases and BN parameters excluded from weight
decay and LARS adaptation; batch 4096; 10 warm-up epochs then cosine decay. Asymmetric views
(appendix B, table 6): crop scale (0.08, 1), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with
p = 0.8, grayscale p = 0.2, Gaussian blur p = 1.0 / 0.1 (23x23 kernel at 224 px, σ in [0.1, 2]),
solarization p = 0.0 / 0.2.

Implementation notes: each view goes through the networks separately, so BN statistics are per
view as in the official code (which also synchronizes BN across devices). The target starts as a
copy of the online network (the official code draws an independent initialization and reports no
difference). Besides the online weights the EMA also averages BN running statistics; the target
only ever runs with batch statistics, so those do not affect training.
``metrics["monitor/student_teacher_cos"]`` is the mean cosine between the online and target
projections of the same view: 1 at the start, and it tells how far the online network runs
ahead of its slow-moving target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core.method import MethodConfig, Progress, StepOutput
from selfsup.errors import ConfigError
from selfsup.heads import mlp
from selfsup.losses import byol_loss
from selfsup.modalities.views import ViewMethod
from selfsup.nn.schedules import momentum_schedule
from selfsup.nn.teacher import ema_update, make_teacher
from selfsup.registry import register_method


@dataclass
class BYOLConfig(MethodConfig):
    name: str = "byol"
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    tau_base: float = 0.996  # EMA momentum at the first step
    tau_final: float = 1.0  # ... and at the last, by the cosine schedule above
    min_batch_size = 2  # BN in the heads needs two samples per batch

    def validate(self) -> None:
        if not 0.0 <= self.tau_base <= 1.0:
            raise ConfigError(f"method.tau_base={self.tau_base}: must be in [0, 1]")
        if not self.tau_base <= self.tau_final <= 1.0:
            raise ConfigError(f"method.tau_final={self.tau_final}: must be in [tau_base, 1]")
        if min(self.proj_hidden_dim, self.proj_dim, self.pred_hidden_dim) < 1:
            raise ConfigError("method.proj_hidden_dim, proj_dim and pred_hidden_dim must be >= 1")


@register_method
class BYOL(ViewMethod):
    name = "byol"
    paper = "Grill et al. 2020, Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning"
    family = "distillation"
    Config = BYOLConfig

    def __init__(self, cfg: BYOLConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        self.require_two_views()
        # the official MLP: Linear -> BN -> ReLU -> Linear without bias (the first bias is
        # dropped here because BN cancels it)
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2, bias_last=False)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2, bias_last=False)
        self.target_backbone = make_teacher(self.backbone)
        self.target_projector = make_teacher(self.projector)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        x1, x2 = self.make_views(batch)
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(x1))
            t2 = self.target_projector(self.target_backbone(x2))
        loss = byol_loss(q1, q2, t1, t2)
        with torch.no_grad():
            agree = 0.5 * (F.cosine_similarity(z1.float(), t1.float(), dim=-1).mean()
                           + F.cosine_similarity(z2.float(), t2.float(), dim=-1).mean())
        return StepOutput(loss=loss, metrics={"monitor/student_teacher_cos": agree.detach()},
                          embeddings=z1.detach())

    def momentum(self, progress: Progress) -> float:
        """τ for the update that follows optimizer step ``progress.step`` (k = step - 1, counted
        from 0 as the official code's global_step, so the first update uses τ_base)."""
        return momentum_schedule(max(0, progress.step - 1), progress.total_steps, self.cfg.tau_base, self.cfg.tau_final)

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.target_backbone, self.backbone), (self.target_projector, self.projector)]

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        tau = self.momentum(progress)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)
