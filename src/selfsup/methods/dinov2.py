"""DINOv2 (Oquab, Darcet, Moutakanni, Vo, Szafraniec, Khalidov, Fernandez, Haziza, Massa,
El-Nouby, Assran, Ballas, Galuba, Howes, Huang, Li, Misra, Rabbat, Sharma, Synnaeve, Xu, Jegou,
Mairal, Labatut, Joulin, Bojanowski 2024, "DINOv2: Learning Robust Visual Features without
Supervision", TMLR).

DINO's self-distillation on the CLS token plus iBOT's masked-patch distillation, regularized by
KoLeo (sec. 4). A student ViT and a teacher ViT (EMA of the student, no stochastic depth, no
mask) share one architecture and one DINO head (a separate iBOT head is a switch).

* Image level (DINO): the teacher sees the 2 global crops, the student the 2 global and n local
  crops; head outputs g_t, g_s of the CLS tokens,

      L_DINO = 1/#pairs Σ_{t ∈ global} Σ_{s ≠ t} -Σ_k p_t^(k) log softmax(g_s / τ_s)^(k).

* Patch level (iBOT): half of the global-crop samples (``mask_probability`` 0.5) get a BEiT
  block mask, their mask ratios spread over (0.1, 0.5): with m masked samples the interval is cut
  in m equal bins and sample i draws its ratio uniformly in bin i (official collate:
  ``linspace`` + ``random.uniform``, masks shuffled over the samples). The student sees the
  learned mask token at masked patches; the teacher the full crop. With M_b the masked patches
  of sample b and B the number of global-crop samples,

      L_iBOT = 1/B Σ_b 1/|M_b| Σ_{i ∈ M_b} -Σ_k p_{t,bi}^(k) log softmax(g_{s,bi} / τ_s)^(k).

* KoLeo on the student's CLS tokens after the backbone's final norm (before the head), one
  global crop at a time: L_koleo = -1/n Σ_i log min_{j≠i} ||x_i - x_j|| (unit x).

      L = w_DINO L_DINO + w_koleo Σ_{global crops} L_koleo + w_iBOT L_iBOT,   w = 1, 0.1, 1.

Teacher targets p_t come from the teacher's head outputs at temperature τ_t by either DINO's
centering (softmax((g_t - c) / τ_t), c an EMA of the batch mean, momentum 0.9; for patches the
mean of the masked patches) or Sinkhorn-Knopp (3 iterations, ε = τ_t; the paper's choice,
``method.centering``). τ_t warms up linearly 0.04 -> 0.07 over 30 epochs, per iteration.
Teacher EMA momentum 0.992 -> 1 (cosine, per iteration). The heads' last layers get no update
in the first epoch.

Official defaults (``dinov2/configs/ssl_default_config.yaml``, ``train/vitl16_short.yaml`` =
ViT-L/16 on ImageNet-1k, 81.6% k-NN / 82.9% linear): DINO head 3 layers 2048 -> 256 -> 65,536
prototypes, weight-normalized last layer with a trainable norm; iBOT head shared
(``separate_head: false``); τ_s 0.1 for both losses; ``centering: centering`` in that config,
``sinkhorn_knopp`` in the paper and its ViT-L/14 and ViT-g/14 LVD-142M configs; KoLeo 0.1;
drop path 0.3, the same rate in every block (``drop_path_uniform``), LayerScale 1e-5; AdamW
(0.9, 0.999), lr 4e-3 x sqrt(batch / 1024), 10 warm-up epochs, cosine to 1e-6, weight decay
0.04 -> 0.4, gradient clipping 3.0, layer-wise lr decay 0.9, patch embedding lr x 0.2,
100 epochs of 1250 iterations at batch 2048 (32 GPUs x 64); 2 global crops 224 px (scale
0.32-1) + 8 local 96 px (scale 0.05-0.32); BEiT masks with at least 4 patches per block and at
most half the grid per block.

Implementation notes: all global crops go through the student in one pass (with their masks),
all local crops in one more; the student head runs once over [global CLS, local CLS, masked
patch tokens] (the official code does the same with a block-diagonal batch). With Sinkhorn
targets the DINO term is ``swav_loss`` (the same average over (teacher crop, other crop) pairs);
with centering it is ``dino_loss``. The patch-token center averages the per-process means, as
the official one. Layer-wise lr decay is ``optim.layer_decay``; the patch-embedding multiplier
reaches the optimizer through ``self.lr_multipliers``. Each global crop's size must be a multiple
of the patch; the mask generator works on that grid. Downstream (``encode``) uses the student
backbone's pooled feature (the official evaluation reads the teacher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core.method import MethodConfig, Progress, StepOutput
from selfsup.errors import ConfigError
from selfsup.heads import DINOHead
from selfsup.losses import (
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp_teacher,
    swav_loss,
)
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
from selfsup.pretext.masking import block_masking
from selfsup.pretext.multicrop import forward_by_resolution
from selfsup.registry import register_method


def ibot_masks(batch: int, grid: tuple[int, int], ratio_min_max: tuple[float, float] = (0.1, 0.5),
               probability: float = 0.5, *, min_patches: int = 4, max_block_frac: float = 0.5,
               device: torch.device | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """iBOT masks for ``batch`` global-crop samples, as DINOv2's ``collate_data_and_cast``:
    m = int(batch * probability) samples are masked; [r_min, r_max] is cut into m equal bins
    (``linspace``) and the i-th masked sample masks int(N * U(bin_i)) patches with BEiT block
    masking (blocks of >= ``min_patches`` and <= ``max_block_frac`` * N patches); which samples
    are masked is a random permutation. One ``block_masking`` call for all masked samples (it
    takes a count per sample). Returns (batch, N) bool, True = masked."""
    gh, gw = grid
    n = gh * gw
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    m = int(batch * probability)
    if m == 0:
        return mask
    edges = torch.linspace(ratio_min_max[0], ratio_min_max[1], m + 1, device=device)
    u = torch.rand(m, device=device, generator=generator)
    counts = (n * (edges[:-1] + u * (edges[1:] - edges[:-1]))).long()
    rows = torch.randperm(batch, device=device, generator=generator)[:m]
    mask[rows] = block_masking(m, (gh, gw), counts, min_patches=min_patches, max_patches=int(max_block_frac * n),
                               device=device, generator=generator)
    return mask


@dataclass
class DINOv2Config(MethodConfig):
    name: str = "dinov2"
    # DINO head (also the iBOT head unless ibot_separate_head)
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = False  # official DINOv2 head: the last layer's weight norm g is trained
    ibot_separate_head: bool = False
    ibot_out_dim: int = 65536
    ibot_hidden_dim: int = 2048
    ibot_bottleneck_dim: int = 256
    ibot_head_layers: int = 3
    # losses
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # after the warm-up
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    centering: str = "sinkhorn_knopp"  # or "centering" (DINO's EMA center)
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    # iBOT masking
    mask_probability: float = 0.5  # fraction of global-crop samples masked
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_min_patches: int = 4  # BEiT block: at least this many patches
    mask_max_block_frac: float = 0.5  # ... and at most this fraction of the grid
    # teacher, schedules, backbone
    momentum_teacher: float = 0.992
    momentum_teacher_end: float = 1.0
    freeze_last_layer_epochs: float = 1.0
    drop_path_uniform: bool = True  # the same stochastic-depth rate in every student block
    patch_embed_lr_mult: float = 0.2  # lr multiplier of the patch embedding (on top of layer decay)
    min_batch_size = 2  # KoLeo needs a nearest neighbour

    def validate(self) -> None:
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must be > 0")
        for key in ("dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight", "warmup_teacher_temp_epochs",
                    "freeze_last_layer_epochs", "patch_embed_lr_mult"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must be >= 0")
        for key in ("center_momentum", "momentum_teacher", "momentum_teacher_end", "mask_probability"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must be in [0, 1]")
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise ConfigError(f"method.centering={self.centering!r}: must be centering or sinkhorn_knopp")
        lo, hi = self.mask_ratio_min_max
        if not 0.0 <= lo <= hi < 1.0:
            raise ConfigError(f"method.mask_ratio_min_max={self.mask_ratio_min_max}: need 0 <= min <= max < 1")
        if self.ibot_loss_weight > 0 and (self.mask_probability == 0 or hi == 0):
            raise ConfigError("method.ibot_loss_weight > 0 needs mask_probability > 0 and a positive mask ratio")
        if not 0.0 < self.mask_max_block_frac <= 1.0 or self.mask_min_patches < 1:
            raise ConfigError("method.mask_max_block_frac must be in (0, 1] and mask_min_patches >= 1")
        if self.sinkhorn_iterations < 1:
            raise ConfigError(f"method.sinkhorn_iterations={self.sinkhorn_iterations}: must be >= 1")
        sizes = (self.out_dim, self.hidden_dim, self.bottleneck_dim, self.head_layers, self.ibot_out_dim,
                 self.ibot_hidden_dim, self.ibot_bottleneck_dim, self.ibot_head_layers)
        if min(sizes) < 1:
            raise ConfigError("method head sizes (out_dim, hidden_dim, bottleneck_dim, head_layers, ibot_*) "
                              "must be >= 1")


def _uniform_drop_path(vit: nn.Module) -> None:
    """DINOv2's ``drop_path_uniform``: every block drops its residual branches with the full
    rate (timm builds 0 -> rate linearly; the rate is read back from the last block)."""
    from timm.layers import DropPath

    rate = max((m.drop_prob for m in vit.modules() if isinstance(m, DropPath)), default=0.0)
    if rate > 0:
        for block in vit.model.blocks:
            block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)


@register_method
class DINOv2(ImageMethod):
    name = "dinov2"
    paper = "Oquab et al. 2024, DINOv2: Learning Robust Visual Features without Supervision"
    family = "distillation"
    Config = DINOv2Config
    uses_local_crops = True  # multi-crop: trains on the augment.n_local small crops too
    figures = ("prototypes",)  # selfsup report: prototype usage (prototype_scores)

    def __init__(self, cfg: DINOv2Config, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        if not (callable(getattr(backbone, "tokens", None)) and hasattr(backbone, "mask_token")):
            raise ConfigError("dinov2 needs a ViT backbone with mask tokens (backbone.name=vit_tiny|vit_small|"
                              "vit_base|vit_large)")
        self.n_global = len(self.views)
        if self.n_global < 1 or self.n_global + len(self.local_views) < 2:
            raise ConfigError("dinov2 needs at least 2 crops (augment.views plus augment.n_local local crops)")
        sizes = {v.size for v in augment.views} | ({augment.local.size} if augment.n_local else set())
        if len({v.size for v in augment.views}) != 1:
            raise ConfigError("dinov2: all global crops (augment.views) must have the same size")
        if any(s % backbone.patch_size for s in sizes):
            raise ConfigError(f"dinov2: crop sizes {sorted(sizes)} must be multiples of the patch size "
                              f"{backbone.patch_size}")
        self.grid = (augment.views[0].size // backbone.patch_size,) * 2
        n_patches = self.grid[0] * self.grid[1]
        if cfg.ibot_loss_weight > 0 and int(n_patches * cfg.mask_ratio_min_max[0]) < 1:
            raise ConfigError(f"method.mask_ratio_min_max[0]={cfg.mask_ratio_min_max[0]} masks no patch of a "
                              f"{n_patches}-patch crop; every masked sample needs >= 1 patch")
        if cfg.drop_path_uniform:
            _uniform_drop_path(backbone)
        # read by train/optim.param_groups: official ``patch_embed_lr_mult`` (with layer decay: 0.2 x 0.9^(L+1))
        self.lr_multipliers = {"backbone.model.patch_embed.": cfg.patch_embed_lr_mult}
        self.head = DINOHead(backbone.out_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                             False, cfg.norm_last_layer)
        self.ibot_head = DINOHead(backbone.out_dim, cfg.ibot_out_dim, cfg.ibot_hidden_dim, cfg.ibot_bottleneck_dim,
                                  cfg.ibot_head_layers, False, cfg.norm_last_layer) if cfg.ibot_separate_head else None
        self.teacher_backbone = make_teacher(self.backbone, no_drop_path=True)  # as the official teacher
        self.teacher_head = make_teacher(self.head)
        self.teacher_ibot_head = make_teacher(self.ibot_head) if self.ibot_head is not None else None
        ibot_dim = cfg.ibot_out_dim if cfg.ibot_separate_head else cfg.out_dim
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))  # used with centering="centering"
        self.register_buffer("ibot_center", torch.zeros(1, ibot_dim))
        self.clock = TrainingClock()
        last = [*self.head.last_layer.parameters(),
                *(self.ibot_head.last_layer.parameters() if self.ibot_head is not None else [])]
        self.freezer = ParamFreezer(last, lambda: self.clock.within(cfg.freeze_last_layer_epochs))

    # ---- schedules ---------------------------------------------------------------------

    def teacher_temp(self) -> float:
        """τ_t of the step being computed: ``np.linspace(warmup_teacher_temp, teacher_temp, W)[it]``
        over the first W = warm-up epochs x steps per epoch iterations (official
        ``CosineScheduler`` warm-up), then constant."""
        c = self.cfg
        if c.warmup_teacher_temp_epochs <= 0:
            return c.teacher_temp
        if not self.clock.steps_per_epoch:  # before the first step: iteration 0
            return c.warmup_teacher_temp
        warm = int(round(c.warmup_teacher_temp_epochs * self.clock.steps_per_epoch))
        it = self.clock.step
        if it >= warm:
            return c.teacher_temp
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * it / max(warm - 1, 1)

    def momentum(self, progress: Progress) -> float:
        """EMA momentum after optimizer step ``progress.step`` (official iteration it = step - 1)."""
        return momentum_schedule(max(0, progress.step - 1), progress.total_steps, self.cfg.momentum_teacher,
                                 self.cfg.momentum_teacher_end)

    # ---- the step ----------------------------------------------------------------------

    def _targets(self, out: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        """Teacher probabilities: Sinkhorn-Knopp, or softmax((g - c) / τ_t) with DINO's center."""
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp_teacher(out, temp, self.cfg.sinkhorn_iterations)
        with torch.autocast(out.device.type, enabled=False):
            return F.softmax((out.float() - center.float()) / temp, dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.cfg
        self.freezer.before_step()
        views = self.make_views(batch)
        n = views[0].shape[0]
        x_global = torch.cat(views[: self.n_global])  # crop-major: crop 0 of every image, then crop 1, ...
        do_ibot = cfg.ibot_loss_weight > 0 and int(x_global.shape[0] * cfg.mask_probability) > 0
        mask = ibot_masks(x_global.shape[0], self.grid, cfg.mask_ratio_min_max, cfg.mask_probability,
                          min_patches=cfg.mask_min_patches, max_block_frac=cfg.mask_max_block_frac,
                          device=x_global.device) if do_ibot else None
        temp = self.teacher_temp()

        with torch.no_grad():
            t_tokens = self.teacher_backbone.tokens(x_global)
            t_cls = t_tokens[:, 0]
            if do_ibot and self.teacher_ibot_head is None:  # shared head: one pass over CLS and patches
                t_out = self.teacher_head(torch.cat([t_cls, t_tokens[:, 1:][mask]]))
                t_cls_out, t_patch_out = t_out[: t_cls.shape[0]], t_out[t_cls.shape[0]:]
            else:
                t_cls_out = self.teacher_head(t_cls)
                t_patch_out = self.teacher_ibot_head(t_tokens[:, 1:][mask]) if do_ibot else None

        s_tokens = self.backbone.tokens(x_global, mask=mask)
        s_cls = s_tokens[:, 0]
        s_local = forward_by_resolution(lambda x: self.backbone.tokens(x)[:, 0], views[self.n_global:])
        s_patch = s_tokens[:, 1:][mask] if do_ibot else None
        head_in = [s_cls, *s_local]
        if do_ibot and self.ibot_head is None:
            head_in.append(s_patch)
        s_out = self.head(torch.cat(head_in))
        s_crops = list(s_out[: n * (self.n_global + len(s_local))].split(n))  # global crops first, then local
        if do_ibot:
            s_patch_out = s_out[n * len(s_crops):] if self.ibot_head is None else self.ibot_head(s_patch)

        t_crops = list(t_cls_out.split(n))
        metrics: dict[str, float | torch.Tensor] = {"dinov2/teacher_temp": temp}
        loss = s_out.new_zeros((), dtype=torch.float32)
        if cfg.dino_loss_weight > 0:
            if cfg.centering == "sinkhorn_knopp":
                targets = sinkhorn_knopp_teacher(t_cls_out, temp, cfg.sinkhorn_iterations).split(n)
                dino = swav_loss(s_crops, targets, cfg.student_temp)
            else:
                dino = dino_loss(s_crops, t_crops, self.center, cfg.student_temp, temp)
            loss = loss + cfg.dino_loss_weight * dino
            metrics["dinov2/dino"] = dino.detach()
        if cfg.koleo_loss_weight > 0:
            koleo = sum(koleo_loss(c) for c in s_cls.split(n))
            loss = loss + cfg.koleo_loss_weight * koleo
            metrics["dinov2/koleo"] = koleo.detach() / self.n_global
        if do_ibot:
            ibot = ibot_patch_loss(s_patch_out, self._targets(t_patch_out, self.ibot_center, temp), mask,
                                   cfg.student_temp)
            loss = loss + cfg.ibot_loss_weight * ibot
            metrics["dinov2/ibot"] = ibot.detach()
            metrics["dinov2/masked_frac"] = mask.float().mean()

        with torch.no_grad():  # centers move after they were used, as the official update
            if cfg.centering == "centering":
                defer_center(self, self.center, t_cls_out, cfg.center_momentum)
                if do_ibot:
                    patch_mean = t_patch_out.float().mean(dim=0, keepdim=True)  # per process, then averaged
                    defer_center(self, self.ibot_center, patch_mean, cfg.center_momentum)
            cos = F.cosine_similarity(s_out[: n * self.n_global].float(), t_cls_out.float(), dim=-1).mean()
        metrics["monitor/student_teacher_cos"] = cos
        metrics["monitor/uniformity"] = prediction_uniformity(s_crops[0], cfg.student_temp)
        return StepOutput(loss=loss, metrics=metrics, embeddings=s_cls[:n].detach())

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)]
        if self.ibot_head is not None:
            pairs.append((self.teacher_ibot_head, self.ibot_head))
        return pairs

    @torch.no_grad()
    def prototype_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """The teacher's image-level (DINO) head outputs (N, out_dim): scores against its last
        layer's prototypes."""
        return self.teacher_head(feats)

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        super().on_step_end(progress)  # the deferred centre updates
        teacher_step(self, progress, self.teacher_pairs())
