"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML).

Two views of each image (random resized crop, flip, colour jitter 0.8, grayscale 0.2, blur on
ImageNet) pass through the encoder f and a 2-layer MLP projection head g; NT-Xent (eq. 1) pulls
the two projections of an image together and pushes all other 2N-2 projections in the batch
away. Downstream tasks use h = f(x), not g(h).

Paper defaults: ResNet-50, projection 2048 -> 2048 -> 128, τ = 0.1 at batch 4096 (τ = 0.5 in the
CIFAR-10 experiments), LARS with lr = 0.3 x batch/256, weight decay 1e-6, 10 warm-up epochs then
cosine decay, colour-jitter strength s = 1.0 (0.5 on CIFAR-10, no blur). Negatives are gathered
across all devices (the paper's "global BN"-era TPU setup uses the whole batch as negatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.heads import ProjectionHead
from selfsup.losses import nt_xent
from selfsup.modalities.views import ViewMethod
from selfsup.registry import register_method


@dataclass
class SimCLRConfig(MethodConfig):
    name: str = "simclr"
    temperature: float = 0.5
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    proj_layers: int = 2
    min_batch_size = 2  # NT-Xent needs at least one negative

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature={self.temperature}: must be > 0")
        if self.proj_dim < 1 or self.proj_hidden_dim < 1 or self.proj_layers < 1:
            raise ConfigError("method.proj_dim, proj_hidden_dim and proj_layers must be >= 1")


@register_method
class SimCLR(ViewMethod):
    name = "simclr"
    paper = "Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations"
    family = "contrastive"
    Config = SimCLRConfig

    def __init__(self, cfg: SimCLRConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        self.require_two_views()
        self.projector = ProjectionHead(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        x1, x2 = self.make_views(batch)
        n = x1.shape[0]
        # one backbone pass over both views: BN statistics over the 2N images, half the launches
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        z1, z2 = z[:n], z[n:]
        loss = nt_xent(z1, z2, self.cfg.temperature)
        return StepOutput(loss=loss, embeddings=z1.detach())
