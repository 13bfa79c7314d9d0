"""MoCo v2: He, Fan, Wu, Xie, Girshick 2020, "Momentum Contrast for Unsupervised Visual
Representation Learning" (CVPR), with the improvements of Chen, Fan, Girshick, He 2020,
"Improved Baselines with Momentum Contrastive Learning" (arXiv:2003.04297).

A query encoder f_q (backbone + 2-layer MLP head) and a key encoder f_k, an exponential moving
average of f_q, embed two views of each image. The keys of earlier batches wait in a FIFO queue
of K normalized keys that serve as negatives:

    q = normalize(f_q(x_q)),  k+ = normalize(f_k(x_k))        (no gradient through f_k)
    L = -log exp(q·k+/τ) / (exp(q·k+/τ) + Σ_{i<K} exp(q·queue_i/τ))      (MoCo eq. 1)
    θ_k <- m θ_k + (1 - m) θ_q   after every optimizer step             (MoCo eq. 2)
    queue <- enqueue(all ranks' k+), dropping the oldest keys

The loss is asymmetric as in the paper: view 0 is the query, view 1 the key. Downstream tasks use
the query backbone. The queue (``queue``, ``queue_ptr``) and the key encoder are buffers and
frozen submodules, so checkpoints carry them and a resumed run continues exactly.

Shuffling BN. In the official code each GPU normalizes its own sub-batch, and the key batch is
shuffled across GPUs first so that a query and its positive key never share BN statistics
(otherwise the model finds the positive by the "signature" of its sub-batch). Here, with several
processes, the key views are shuffled across ranks the same way. Each process can also emulate
``bn_splits`` GPUs (like SplitBatchNorm in the official CIFAR demo): its batch is cut into
``bn_splits`` groups that are normalized separately, the key batch being shuffled across all
groups first. With one process and ``bn_splits: 1`` (the default) there is nothing to shuffle:
the query and key batches are simply normalized per view, which leaves the intra-batch signal in
place; set ``bn_splits`` (e.g. 8) for single-process training.

Defaults (MoCo v2, ImageNet, 8 GPUs): ResNet-50; head 2048 -> 2048 -> 128 (Linear-ReLU-Linear,
no BN, as in the official code); K = 65,536; m = 0.999 (constant); τ = 0.2; SGD lr 0.03 x
batch/256, momentum 0.9, weight decay 1e-4, batch 256, 200 epochs, cosine decay, no warm-up;
augmentation: crop scale 0.2-1, colour jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale 0.2, Gaussian blur
σ ∈ [0.1, 2] p=0.5, horizontal flip. K must be a multiple of the global batch (as the official
code asserts), so every batch of keys occupies one aligned block of the queue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup import dist
from selfsup.core.method import MethodConfig, Progress, StepOutput
from selfsup.errors import ConfigError
from selfsup.heads import mlp
from selfsup.losses import moco_info_nce
from selfsup.modalities.views import ViewMethod
from selfsup.nn.teacher import ema_update, make_teacher
from selfsup.registry import register_method


@dataclass
class MoCoV2Config(MethodConfig):
    name: str = "mocov2"
    temperature: float = 0.2
    queue_size: int = 65536  # K: negatives; a multiple of the global batch
    momentum: float = 0.999  # m of the key encoder's EMA (constant)
    proj_hidden_dim: int = 2048  # official: the backbone's width (2048 for ResNet-50)
    proj_dim: int = 128
    bn_splits: int = 1  # BN groups per process (emulated GPUs for Shuffling BN)
    min_batch_size = 2  # BatchNorm needs more than one sample

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature={self.temperature}: must be > 0")
        if self.queue_size < 1:
            raise ConfigError(f"method.queue_size={self.queue_size}: must be >= 1")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"method.momentum={self.momentum}: must be in [0, 1]")
        if self.proj_dim < 1 or self.proj_hidden_dim < 1:
            raise ConfigError("method.proj_dim and method.proj_hidden_dim must be >= 1")
        if self.bn_splits < 1:
            raise ConfigError(f"method.bn_splits={self.bn_splits}: must be >= 1")


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """FIFO update in place: write ``keys`` (n, d) into ``queue`` (K, d) from row ``ptr`` on,
    wrapping around the end, and advance ``ptr`` (a 1-element long tensor) by n modulo K. The
    overwritten rows are the oldest keys. With n > K only the newest K keys are kept. No host
    sync: the pointer stays on the device."""
    size, n = queue.shape[0], keys.shape[0]
    if n > size:
        keys = keys[n - size:]
        ptr.add_(n - size).remainder_(size)
        n = size
    rows = (ptr + torch.arange(n, device=queue.device)).remainder_(size)
    queue.index_copy_(0, rows, keys.to(queue.dtype))
    ptr.add_(n).remainder_(size)


@register_method
class MoCoV2(ViewMethod):
    name = "mocov2"
    paper = "Chen, Fan, Girshick, He 2020, Improved Baselines with Momentum Contrastive Learning (MoCo: He et al. 2020)"
    family = "contrastive"
    Config = MoCoV2Config

    def __init__(self, cfg: MoCoV2Config, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        self.require_two_views(no_local=True)
        # official v2 head: Linear(2048, 2048) - ReLU - Linear(2048, 128), biases, no BN
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2, bn_hidden=False)
        self.key_backbone = make_teacher(self.backbone)
        self.key_projector = make_teacher(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _grouped(self, backbone: nn.Module, projector: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """projector(backbone(x)) with BN statistics per group of n / bn_splits samples."""
        groups = self.cfg.bn_splits
        if groups == 1:
            return projector(backbone(x))
        return torch.cat([projector(backbone(self.layout(c))) for c in x.chunk(groups)])

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized keys of the whole global batch, in the original (rank-major) order, computed
        with Shuffling BN: the key views are permuted across ranks and BN groups, encoded, and
        un-permuted."""
        n, world = x.shape[0], dist.world_size()
        if world == 1 and self.cfg.bn_splits == 1:
            return F.normalize(self.key_projector(self.key_backbone(x)).float(), dim=1)
        x_all = dist.gather(x, grad=False)
        perm = torch.randperm(x_all.shape[0], device=x.device)
        if world > 1:  # every rank must use rank 0's permutation: a broadcast via a sum
            perm = dist.all_reduce_sum(perm if dist.rank() == 0 else torch.zeros_like(perm))
        mine = perm[dist.rank() * n:(dist.rank() + 1) * n]
        k = F.normalize(self._grouped(self.key_backbone, self.key_projector, self.layout(x_all[mine])).float(), dim=1)
        return dist.gather(k, grad=False)[torch.argsort(perm)]

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        x_q, x_k = self.make_views(batch)
        n, groups = x_q.shape[0], self.cfg.bn_splits
        if n % groups:
            raise ConfigError(f"method.bn_splits={groups} must divide the per-process batch ({n})")
        k_all = self._keys(x_k)
        if self.cfg.queue_size % k_all.shape[0]:
            raise ConfigError(
                f"method.queue_size={self.cfg.queue_size} must be a multiple of the global batch "
                f"({k_all.shape[0]} keys per step = data.batch_size / trainer.accumulate)")
        start = dist.rank() * n if k_all.shape[0] != n else 0
        k = k_all[start:start + n]
        q = self._grouped(self.backbone, self.projector, x_q)
        loss = moco_info_nce(q, k, self.queue, self.cfg.temperature)
        # the keys join the queue after the update, and only if the trainer keeps the step: the
        # keys of a dropped (non-finite) step may be NaN themselves
        self.defer(lambda: enqueue(self.queue, self.queue_ptr, k_all))
        with torch.no_grad():
            cos = (F.normalize(q.float(), dim=1) * k).sum(dim=1).mean()
        return StepOutput(loss=loss, metrics={"monitor/student_teacher_cos": cos}, embeddings=q.detach())

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.key_backbone, self.backbone), (self.key_projector, self.projector)]

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        super().on_step_end(progress)  # enqueue this step's keys (one batch per micro-batch)
        ema_update(self.key_backbone, self.backbone, self.cfg.momentum)
        ema_update(self.key_projector, self.projector, self.cfg.momentum)
