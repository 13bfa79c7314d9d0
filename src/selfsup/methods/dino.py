"""DINO (Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin 2021, "Emerging Properties in
Self-Supervised Vision Transformers", ICCV).

Self-distillation with no labels. A student g_θs (backbone + DINO head) is trained to match a
teacher g_θt of the same architecture whose weights are an exponential moving average of the
student's (sec. 3.1, Algorithm 1):

    θt <- λ θt + (1 - λ) θs  after every step,  λ: 0.996 -> 1 by a cosine schedule.

Multi-crop: the teacher sees only the global crops, the student every crop (global and local).
Teacher outputs are centered and sharpened, student outputs only sharpened,

    P_t = softmax((g_θt(x_t) - c) / τ_t),   P_s = softmax(g_θs(x_s) / τ_s),
    L = 1/#pairs Σ_{t ∈ global} Σ_{s ≠ t} H(P_t, P_s) = -Σ_k P_t^(k) log P_s^(k)   (eq. 2-3),

and the center follows the teacher's batch mean, c <- m c + (1 - m) mean_i g_θt(x_i) (eq. 4,
m = 0.9, over the global batch). Centering stops one dimension from dominating, sharpening stops
the uniform collapse that centering alone would encourage.

DINO head (official ``DINOHead``): a 3-layer MLP in_dim -> 2048 -> 2048 -> 256 (GELU, no BN),
L2-normalization, then a weight-normalized linear layer 256 -> K = 65,536 without bias whose
norm g is fixed to 1 (``norm_last_layer``; trainable with ``norm_last_layer: false``, which the
authors use for ViT-S). The last layer is frozen during the first epoch (``freeze_last_layer``).
Downstream tasks use the student backbone (the features the collapse monitor watches: the CLS
token of a ViT, the pooled features of a ResNet); the official evaluation reads the teacher.

Defaults (paper sec. 3.1 / appendix and the official ``main_dino.py``): ViT-S/16 with
stochastic depth 0.1 (student only); τ_s = 0.1; τ_t = 0.04 (the code default; the paper's runs
warm it up linearly from 0.04 to 0.07 over the first 30 epochs, per epoch); center momentum 0.9;
teacher momentum 0.996 -> 1; AdamW with lr 5e-4 x batch/256 (batch 1024), 10 warm-up epochs,
cosine to 1e-6, weight decay 0.04 -> 0.4 (cosine), no decay on biases and norms, gradient
clipping 3.0, 100 epochs; 2 global crops of 224 (scale 0.4-1 for ViT-S, 0.14-1 for other
models) and 8 local crops of 96 (scale 0.05-0.4).

Implementation notes: views of one resolution go through a backbone together (one pass per
resolution, the official ``MultiCropWrapper``); a timm ViT is switched to dynamic input size so
the 96-px crops interpolate its position embeddings. The center is updated right after the loss
with the teacher outputs of ``forward``, as the official loss module does, but stored in
``on_step_end``, so a step the trainer drops (non-finite loss) does not move it; under gradient
accumulation each micro-batch's update is applied in order, every micro-batch's loss using the
centre of the previous step.
Freezing the last layer zeroes its gradients in a hook and restores its values after the step
(see ``selfsup.nn.teacher.ParamFreezer``); the official code drops the gradients after clipping, so there its
gradient still counts in the clipping norm. ``metrics["monitor/student_teacher_cos"]`` is the
mean cosine between student and teacher outputs for the same global crop;
``metrics["monitor/uniformity"]`` is the student's prediction entropy over ln K, which the collapse
monitor flags near 1: the head's outputs gone uniform, the loss stuck at ln K. A CIFAR ResNet-18
without ``use_bn_in_head`` fell into that within 100 steps at the short CPU budget (see
benchmarks/knn_table.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core.method import MethodConfig, Progress, StepOutput
from selfsup.errors import ConfigError
from selfsup.heads import DINOHead
from selfsup.losses import dino_loss
from selfsup.modalities.image import ImageMethod
from selfsup.nn.metrics import prediction_uniformity
from selfsup.nn.schedules import momentum_schedule
from selfsup.nn.teacher import (
    ParamFreezer,
    TrainingClock,
    defer_center,
    make_teacher,
    teacher_step,
)
from selfsup.pretext.multicrop import (
    allow_any_input_size,
    forward_by_resolution,
    multicrop_sizes,
)
from selfsup.registry import register_method


@dataclass
class DINOConfig(MethodConfig):
    name: str = "dino"
    out_dim: int = 65536  # K
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # after the warm-up
    warmup_teacher_temp: float = 0.04  # at epoch 0
    warmup_teacher_temp_epochs: int = 0  # paper's runs: 30 (0.04 -> 0.07)
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    freeze_last_layer_epochs: float = 1.0
    min_batch_size = 2

    def validate(self) -> None:
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must be > 0")
        for key in ("center_momentum", "momentum_teacher", "momentum_teacher_end"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must be in [0, 1]")
        if min(self.out_dim, self.hidden_dim, self.bottleneck_dim, self.head_layers) < 1:
            raise ConfigError("method.out_dim, hidden_dim, bottleneck_dim and head_layers must be >= 1")
        if self.warmup_teacher_temp_epochs < 0 or self.freeze_last_layer_epochs < 0:
            raise ConfigError("method.warmup_teacher_temp_epochs and freeze_last_layer_epochs must be >= 0")


@register_method
class DINO(ImageMethod):
    name = "dino"
    paper = "Caron et al. 2021, Emerging Properties in Self-Supervised Vision Transformers"
    family = "distillation"
    Config = DINOConfig
    uses_local_crops = True  # multi-crop: trains on the augment.n_local small crops too
    figures = ("prototypes",)  # selfsup report: prototype usage (prototype_scores)

    def __init__(self, cfg: DINOConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        self.n_global = len(self.views)
        if self.n_global + len(self.local_views) < 2:
            raise ConfigError("dino needs at least 2 crops (augment.views plus augment.n_local local crops)")
        if len(multicrop_sizes(augment)) > 1:
            allow_any_input_size(backbone)  # ViTs: local crops are smaller than img_size
        self.head = DINOHead(backbone.out_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                             cfg.use_bn_in_head, cfg.norm_last_layer)
        self.teacher_backbone = make_teacher(self.backbone, no_drop_path=True)  # as the official teacher
        self.teacher_head = make_teacher(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.clock = TrainingClock()
        # after make_teacher: parameter hooks must stay on the student
        self.freezer = ParamFreezer(self.head.last_layer.parameters(),
                                    lambda: self.clock.within(cfg.freeze_last_layer_epochs))

    def teacher_temp(self) -> float:
        """τ_t of the current epoch: linear from warmup_teacher_temp to teacher_temp over the
        warm-up epochs (np.linspace(start, end, n)[epoch] as the official code), then constant."""
        c, e = self.cfg, self.clock.epoch
        n = c.warmup_teacher_temp_epochs
        if e >= n:
            return c.teacher_temp
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * e / max(n - 1, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        self.freezer.before_step()
        views = self.make_views(batch)
        n = views[0].shape[0]
        feats = forward_by_resolution(self.backbone, views)
        student = self.head(torch.cat(feats)).split(n)
        with torch.no_grad():
            t_feats = forward_by_resolution(self.teacher_backbone, views[: self.n_global])
            teacher = self.teacher_head(torch.cat(t_feats)).split(n)
        temp = self.teacher_temp()
        loss = dino_loss(student, teacher, self.center, self.cfg.student_temp, temp)
        with torch.no_grad():
            defer_center(self, self.center, teacher, self.cfg.center_momentum)
            cos = torch.stack([F.cosine_similarity(student[t].float(), teacher[t].float(), dim=-1).mean()
                               for t in range(self.n_global)]).mean()
        uniformity = prediction_uniformity(student[0], self.cfg.student_temp)
        return StepOutput(loss=loss, metrics={"monitor/student_teacher_cos": cos, "monitor/uniformity": uniformity,
                                              "dino/teacher_temp": temp}, embeddings=feats[0].detach())

    def momentum(self, progress: Progress) -> float:
        """λ for the update after optimizer step ``progress.step`` (official iteration index
        it = step - 1, so the first update uses momentum_teacher)."""
        return momentum_schedule(max(0, progress.step - 1), progress.total_steps, self.cfg.momentum_teacher,
                                 self.cfg.momentum_teacher_end)

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)]

    @torch.no_grad()
    def prototype_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """The teacher head's outputs (N, out_dim): scores against its last layer's prototypes."""
        return self.teacher_head(feats)

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        super().on_step_end(progress)  # the deferred centre updates
        teacher_step(self, progress, self.teacher_pairs())
