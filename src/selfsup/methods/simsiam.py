"""SimSiam (Chen, He 2021, "Exploring Simple Siamese Representation Learning", CVPR).

Two views x1, x2 of an image pass through one encoder f (backbone + projection MLP), giving
z1, z2; a prediction MLP h maps each to p1 = h(z1), p2 = h(z2). With the negative cosine
D(p, z) = -(p / ||p||₂) · (z / ||z||₂) the loss is (eq. 4)

    L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2,

averaged over the images (minimum -1). There are no negatives and no momentum encoder: the
stop-gradient alone prevents collapse (sec. 4.1). Downstream tasks use the backbone.

Paper defaults (ImageNet, sec. 3 and appendix A): ResNet-50 (zero-initialized last BN scale in
each residual block); projection MLP of 3 layers, 2048-d hidden and output, BN after every layer
including the output (no ReLU there; the official code makes that BN affine-free); prediction MLP
2048 -> 512 -> 2048 with BN+ReLU on the hidden layer and neither on the output (a bottleneck);
SGD with momentum 0.9, lr = 0.05 x batch/256, weight decay 1e-4 on all parameters (BN and
biases included), batch 512, cosine decay over 100 epochs, no warm-up below batch 1024; the
predictor's lr is kept constant (not decayed; sec. 4.2 and table 1: 68.1% vs 67.7% with a decayed
one). That is the variant the official code runs for its 100-epoch result (facebookresearch/simsiam
README: ``main_simsiam.py --fix-pred-lr``, "a non-decaying predictor learning rate ... the last row
of Table 1"), and the one implemented here: ``fixed_lr_modules`` puts the predictor's parameters in
optimizer groups marked ``fixed_lr`` (``train.optim.param_groups``), which the trainer holds at the
base lr (lr x batch/256, as the official ``init_lr``) at every step, with neither warm-up nor decay,
while the encoder's groups follow the schedule. Views: crop scale (0.2, 1), flip, colour jitter
(0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, Gaussian blur σ in [0.1, 2] with p = 0.5
(official code). CIFAR-10 (appendix D): CIFAR ResNet-18, a 2-layer projection MLP with 2048-d
outputs, lr 0.03 x batch/256, weight decay 5e-4, batch 512, 800 epochs, 32 px, no blur; the
CIFAR recipe holds the predictor's lr constant as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.heads import mlp
from selfsup.losses import simsiam_loss
from selfsup.modalities.views import ViewMethod
from selfsup.registry import register_method


@dataclass
class SimSiamConfig(MethodConfig):
    name: str = "simsiam"
    proj_hidden_dim: int = 2048
    proj_dim: int = 2048
    proj_layers: int = 3  # 2 in the paper's CIFAR experiments
    pred_hidden_dim: int = 512  # bottleneck: a quarter of proj_dim (appendix B)
    min_batch_size = 2  # BN in the heads needs two samples per batch

    def validate(self) -> None:
        if min(self.proj_hidden_dim, self.proj_dim, self.pred_hidden_dim) < 1:
            raise ConfigError("method.proj_hidden_dim, proj_dim and pred_hidden_dim must be >= 1")
        if self.proj_layers < 1:
            raise ConfigError(f"method.proj_layers={self.proj_layers}: must be >= 1")


@register_method
class SimSiam(ViewMethod):
    name = "simsiam"
    paper = "Chen & He 2021, Exploring Simple Siamese Representation Learning"
    family = "distillation"
    Config = SimSiamConfig
    # optimizer hint: these train at the constant base lr, off the schedule (sec. 4.2, official --fix-pred-lr)
    fixed_lr_modules: ClassVar[tuple[str, ...]] = ("predictor",)

    def __init__(self, cfg: SimSiamConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        self.require_two_views()
        # Linear -> BN -> ReLU on hidden layers; the output Linear is followed by an affine-free BN
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, bn_last=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        x1, x2 = self.make_views(batch)
        # one pass per view, as the official code: BN statistics are those of one view
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, p2, z1, z2)
        return StepOutput(loss=loss, embeddings=z1.detach())
