"""MoCo v3: Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers" (ICCV).

No queue: the keys are the other view's momentum projections of the same (large) batch. The base
encoder is backbone f -> projector g -> predictor h; the momentum encoder is an EMA copy of f and g
(not h). For two views x1, x2 of a batch (Algorithm 1):

    q_v = h(g(f(x_v))),   k_v = g_m(f_m(x_v))                       (no gradient through k)
    ctr(q, k) = 2τ · CE(normalize(q) · normalize(k_all)ᵀ / τ, labels = arange(n) + rank·n)
    L = ctr(q1, k2) + ctr(q2, k1)
    θ_m <- m θ_m + (1 - m) θ   after every optimizer step,  m = 1 - (1 - m0)(1 + cos(π t / T)) / 2

where k_all gathers the keys of every rank (the global batch: N - 1 negatives per query) and the
factor 2τ is the official code's. Each view goes through the encoders on its own, so BN
statistics are per view, as in the official code. Downstream tasks use the backbone f.

Heads (official ``moco/builder.py``): every Linear has no bias; hidden layers are Linear-BN-ReLU
with width 4096; the projector ends in a BN without affine parameters (SimCLR-style); outputs
are 256-d. The paper uses a 3-layer projector and BN on every layer of the 2-layer predictor
(our defaults); the official ResNet model uses a 2-layer projector and no BN at the predictor's
output (``proj_layers: 2, pred_last_bn: false`` in the ResNet recipes). For ViT backbones the
patch projection is frozen at its random init (``freeze_patch_embed``, the paper's "random patch
projection", sec. 4.2; ``--stop-grad-conv1`` in the official ViT recipes), a fix for the
training instability the paper studies. The official ViT also uses fixed 2-D sin-cos position
embeddings; with ``timm:`` backbones we keep timm's learned ones.

Defaults (paper, ViT-B/16): τ = 0.2, m0 = 0.99 rising to 1 with a half-cosine per step, AdamW
lr 1.5e-4 x batch/256, weight decay 0.1, batch 4096, 300 epochs with 40 warm-up epochs;
BYOL's asymmetric augmentation (crop 0.08-1, jitter 0.4/0.4/0.2/0.1 p=0.8, grayscale 0.2, blur
p = 1.0 / 0.1, solarize p = 0 / 0.2, flip). The official ResNet-50 recipe instead uses τ = 1.0
(the code's default; only the ViT commands pass ``--moco-t=.2``), LARS lr 0.6 x batch/256
(0.3 for 300+ epochs), weight decay 1e-6, 10 warm-up epochs and crop scale 0.2-1, with SyncBN
across GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core.method import MethodConfig, Progress, StepOutput
from selfsup.errors import ConfigError
from selfsup.heads import mlp
from selfsup.losses import moco_v3_loss
from selfsup.modalities.views import ViewMethod
from selfsup.nn.teacher import EMA, make_teacher
from selfsup.registry import register_method


@dataclass
class MoCoV3Config(MethodConfig):
    name: str = "mocov3"
    temperature: float = 0.2
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    proj_layers: int = 3  # paper; the official ResNet model uses 2
    pred_hidden_dim: int = 4096
    pred_last_bn: bool = True  # paper / official ViT; the official ResNet predictor has no last BN
    momentum: float = 0.99  # m0, rising to momentum_end with a half-cosine over training
    momentum_end: float = 1.0
    freeze_patch_embed: bool = True  # ViTs: random (frozen) patch projection
    min_batch_size = 2  # in-batch negatives and BatchNorm

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature={self.temperature}: must be > 0")
        if min(self.proj_hidden_dim, self.proj_dim, self.proj_layers, self.pred_hidden_dim) < 1:
            raise ConfigError("method.proj_hidden_dim, proj_dim, proj_layers and pred_hidden_dim must be >= 1")
        for key in ("momentum", "momentum_end"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must be in [0, 1]")


@register_method
class MoCoV3(ViewMethod):
    name = "mocov3"
    paper = "Chen, Xie, He 2021, An Empirical Study of Training Self-Supervised Vision Transformers"
    family = "contrastive"
    Config = MoCoV3Config

    def __init__(self, cfg: MoCoV3Config, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        self.require_two_views(no_local=True)
        patch = getattr(getattr(backbone, "model", backbone), "patch_embed", None)
        if cfg.freeze_patch_embed and patch is not None:
            for p in patch.parameters():
                p.requires_grad_(False)
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers,
                             bn_last=True, bias_last=False)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2,
                             bn_last=cfg.pred_last_bn, bias_last=False)
        self.momentum_backbone = make_teacher(self.backbone)
        self.momentum_projector = make_teacher(self.projector)
        self.ema = EMA(cfg.momentum, cfg.momentum_end)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        x1, x2 = self.make_views(batch)
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
        loss = moco_v3_loss(q1, q2, k1, k2, self.cfg.temperature)
        with torch.no_grad():
            cos = 0.5 * (F.cosine_similarity(q1.float(), k2.float()).mean()
                         + F.cosine_similarity(q2.float(), k1.float()).mean())
        return StepOutput(loss=loss, metrics={"monitor/student_teacher_cos": cos}, embeddings=z1.detach())

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.momentum_backbone, self.backbone), (self.momentum_projector, self.projector)]

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        # the official code applies m(t) just before step t's forward; after step t-1 is the same
        self.ema.update(self.momentum_backbone, self.backbone, progress.step, progress.total_steps)
        self.ema.update(self.momentum_projector, self.projector, progress.step, progress.total_steps)
