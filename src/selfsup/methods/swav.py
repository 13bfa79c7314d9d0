"""SwAV (Caron, Misra, Mairal, Goyal, Bojanowski, Joulin 2020, "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments", NeurIPS).

Online clustering instead of pairwise contrast. Every crop x_v of an image goes through the
backbone f and a projection MLP g, and is L2-normalized: z_v = g(f(x_v)) / ||.||₂. Its scores
against K learnable prototypes c_k (unit vectors, the columns of C) are z_vᵀC. For each global
crop i, a soft cluster assignment ("code") q_i is computed without gradient by Sinkhorn-Knopp on
the batch's scores, which spreads the batch equally over the prototypes (sec. 3.1):

    Q = Diag(u) exp(CᵀZ / ε) Diag(v),   rows sum to 1/K, columns to 1/B   (ε = 0.05, 3 iterations)

and q_i is then predicted from every other crop v (global and local, multi-crop sec. 3.2) by the
"swapped" prediction loss (eq. 1-2):

    L = 1/|G| Σ_{i∈G} 1/(V-1) Σ_{v≠i} -Σ_k q_i^(k) log softmax(z_vᵀC / τ)^(k),   τ = 0.1.

The prototypes are kept unit-norm (the official code re-normalizes them before every forward; here
after every kept update, which gives every forward the same values), and they get no update during the first
epoch (the official ``freeze_prototypes_niters`` = 313 iterations, one epoch at batch 4096).
With small batches an optional queue of the global crops' projections from earlier batches
(``queue_length``, from epoch ``queue_start_epoch``) enlarges the batch Sinkhorn sees; the
loss is still computed on the current batch only. Downstream tasks use the backbone f.

Defaults (paper and the official ``main_swav.py`` / ``scripts/swav_800ep_pretrain.sh``):
ResNet-50; projection 2048 -> 2048 (BN, ReLU) -> 128; 3000 prototypes; ε 0.05, 3 Sinkhorn
iterations, τ 0.1; multi-crop 2x224 (scale 0.14-1) + 6x96 (scale 0.05-0.14); LARS (trust
coefficient 1e-3, no clipping, every parameter adapted and decayed) with lr 4.8 at batch 4096
(0.3 x batch/256), 10 warm-up epochs, cosine to 0.0048, weight decay 1e-6, 800 epochs; no queue
at batch 4096 (batch 256: queue 3840 from epoch 15).

Implementation notes: views of one resolution run through the backbone together (one pass per
resolution, as the official multi-resolution forward), and the projection head sees all crops in
one batch, so its BN statistics span every crop. Prototype freezing zeroes the prototypes'
gradients in a hook (before any all-reduce and the optimizer) and restores their values after
the step, so weight decay and momentum cannot move them either; the official code sets their
``grad`` to None instead, which leaves no trace in the optimizer state. The queue push and the
prototype normalization happen in ``on_step_end``, only for steps the trainer keeps: a dropped
non-finite step leaves neither NaN projections in the queue nor anything else behind. Under
gradient accumulation every micro-batch therefore sees the queue of the previous step.
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
from selfsup.losses import sinkhorn_knopp, swav_loss
from selfsup.losses._precision import autocast_off
from selfsup.modalities.image import ImageMethod
from selfsup.nn.metrics import prediction_uniformity
from selfsup.nn.teacher import ParamFreezer, TrainingClock
from selfsup.pretext.multicrop import (
    allow_any_input_size,
    forward_by_resolution,
    multicrop_sizes,
)
from selfsup.registry import register_method


@dataclass
class SwAVConfig(MethodConfig):
    name: str = "swav"
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    n_prototypes: int = 3000
    temperature: float = 0.1  # τ of the swapped prediction
    epsilon: float = 0.05  # ε of Sinkhorn-Knopp
    sinkhorn_iterations: int = 3
    freeze_prototypes_epochs: float = 1.0  # official: 313 iterations = 1 epoch at batch 4096
    queue_length: int = 0  # projections queued per global crop, over all ranks (0: no queue)
    queue_start_epoch: int = 15
    min_batch_size = 2  # BN in the projection head

    def validate(self) -> None:
        for key in ("temperature", "epsilon"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must be > 0")
        if self.sinkhorn_iterations < 1:
            raise ConfigError(f"method.sinkhorn_iterations={self.sinkhorn_iterations}: must be >= 1")
        if min(self.proj_hidden_dim, self.proj_dim, self.n_prototypes) < 1:
            raise ConfigError("method.proj_hidden_dim, proj_dim and n_prototypes must be >= 1")
        if self.freeze_prototypes_epochs < 0 or self.queue_length < 0 or self.queue_start_epoch < 0:
            raise ConfigError("method.freeze_prototypes_epochs, queue_length and queue_start_epoch must be >= 0")


@register_method
class SwAV(ImageMethod):
    name = "swav"
    paper = "Caron et al. 2020, Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"
    family = "clustering"
    Config = SwAVConfig
    uses_local_crops = True  # multi-crop: trains on the augment.n_local small crops too
    figures = ("prototypes",)  # selfsup report: prototype usage (prototype_scores)

    def __init__(self, cfg: SwAVConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        self.n_global = len(self.views)
        if self.n_global + len(self.local_views) < 2:
            raise ConfigError("swav needs at least 2 crops (augment.views plus augment.n_local local crops)")
        if len(multicrop_sizes(augment)) > 1:
            allow_any_input_size(backbone)  # ViTs: local crops are smaller than img_size
        self.projector = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2)
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.n_prototypes, bias=False)
        self.clock = TrainingClock()
        self.freezer = ParamFreezer(self.prototypes.parameters(),
                                    lambda: self.clock.within(cfg.freeze_prototypes_epochs))
        # the queue of global-crop projections (None, and not in checkpoints, when off)
        queue = torch.zeros(self.n_global, cfg.queue_length, cfg.proj_dim) if cfg.queue_length else None
        self.register_buffer("queue", queue)
        self.normalize_prototypes()
        # checkpoints of older versions hold the prototypes as the last update left them
        self.register_load_state_dict_post_hook(lambda module, keys: module.normalize_prototypes())

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        self.freezer.before_step()
        views = self.make_views(batch)
        n = views[0].shape[0]
        feats = forward_by_resolution(self.backbone, views)
        z = F.normalize(self.projector(torch.cat(feats)), dim=1)
        with autocast_off(z):  # the logits: cosines / τ = 0.1, and Sinkhorn's exp(s / ε = 0.05), in fp32
            scores = F.linear(z.float(), self.prototypes.weight.float())
        z_crops, score_crops = z.split(n), scores.split(n)
        codes = [self.codes(i, score_crops[i], z_crops[i]) for i in range(self.n_global)]
        loss = swav_loss(score_crops, codes, self.cfg.temperature)
        uniformity = prediction_uniformity(score_crops[0], self.cfg.temperature)
        return StepOutput(loss=loss, metrics={"monitor/uniformity": uniformity}, embeddings=z_crops[0].detach())

    @torch.no_grad()
    def codes(self, i: int, scores: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Sinkhorn codes of global crop ``i``. With the queue on, once it is full the queued
        projections join the batch in Sinkhorn; then the crop's projections are queued.

        The queue is global and identical on every rank (it queues the gathered projections, so
        DDP's buffer broadcast and rank 0's checkpoint lose nothing); each rank feeds its own
        1/world slice to Sinkhorn, whose sums run over ranks. Sinkhorn thus sees the last
        ``queue_length`` projections of the global batch once, as with the official per-rank
        queues."""
        eps, iters = self.cfg.epsilon, self.cfg.sinkhorn_iterations
        if self.queue is None or self.clock.epoch < self.cfg.queue_start_epoch:
            return sinkhorn_knopp(scores, eps, iters)
        queue, n = self.queue[i], scores.shape[0]
        z_all = dist.gather(z.float(), grad=False)
        if queue.shape[0] < z_all.shape[0]:
            raise ConfigError(f"method.queue_length={self.cfg.queue_length} is shorter than the global batch of "
                              f"{z_all.shape[0]}; use 0 (off) or a multiple of the batch")
        per_rank = queue.shape[0] // dist.world_size()
        mine = queue[dist.rank() * per_rank:(dist.rank() + 1) * per_rank]
        with autocast_off(mine):
            queued = mine.float() @ self.prototypes.weight.float().T
        with_queue = sinkhorn_knopp(torch.cat([queued, scores.float()]),
                                    eps, iters)[-n:]
        full = (queue[-1] != 0).any()  # stays a tensor: no host sync
        q = torch.where(full, with_queue, sinkhorn_knopp(scores, eps, iters))
        self.defer(lambda: push_front(queue, z_all))  # after the update, only if the step is kept
        return q

    @torch.no_grad()
    def prototype_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Cosines of the projected backbone features with the prototypes: (N, n_prototypes)."""
        z = F.normalize(self.projector(feats).float(), dim=1)
        return z @ F.normalize(self.prototypes.weight.float(), dim=1).t()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Unit prototypes. The official code re-normalizes them before every forward; doing it after
        every kept update (and at construction and load) gives every forward the same unit
        prototypes, while a dropped step leaves them untouched."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        super().on_step_end(progress)  # queue pushes deferred by ``codes``
        if not self.freezer.after_step():  # frozen: restored to the unit vectors they were
            self.normalize_prototypes()
        self.clock.tick(progress)


def push_front(queue: torch.Tensor, z: torch.Tensor) -> None:
    """Shift ``queue`` (length, dim) back by len(z) rows, dropping the oldest, and put ``z`` first."""
    m = z.shape[0]
    queue[m:] = queue[:-m].clone()
    queue[:m] = z
