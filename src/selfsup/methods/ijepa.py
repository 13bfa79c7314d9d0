"""I-JEPA (Assran, Duval, Misra, Bojanowski, Vincent, Rabbat, LeCun, Ballas 2023, "Self-Supervised
Learning from Images with a Joint-Embedding Predictive Architecture", CVPR).

From one context block of an image, predict the representations of several target blocks of the
same image, in representation space, with no hand-crafted view augmentation (sec. 3). Per image,
multi-block masking (``pretext.masking.multiblock_masking``, the official ``MaskCollator``) draws
M = 4 target blocks B_1..B_M (scale 0.15-0.2 of the patches, aspect ratio 0.75-1.5) and one
context block (scale 0.85-1.0, aspect 1) from which every target patch is removed; one block size
per batch, and every index set is cut to the shortest in the batch; the context keeps more than
``min_keep`` patches.

* Target encoder f_θ̄ (an EMA copy of the context encoder, no gradient) reads the full image;
  its last-layer patch tokens are layer-normed over the features without an affine map and
  gathered at each block: s_y(i) = {s_yj}_{j ∈ B_i}.
* Context encoder f_θ reads only the context patches: s_x = {s_xj}_{j ∈ B_x}.
* Predictor g_φ (a narrow ViT): Linear(d -> d_p) on s_x plus fixed 2-D sin-cos positions of the
  context patches, then, for each block i, |B_i| copies of a learned mask token plus the sin-cos
  positions of B_i appended; depth blocks, LayerNorm, Linear(d_p -> d); the outputs at the mask
  tokens are ŝ_y(i) (official ``VisionTransformerPredictor``: the context is repeated once per
  block, so the predictor runs on M x batch sequences).
* Loss (eq. 1), the mean over blocks, tokens and features of ℓ(ŝ_y(i) - s_y(i)), where the code
  uses smooth-L1 (β = 1) for the paper's squared L2 (``losses.ijepa_loss``).
* θ̄ <- m θ̄ + (1 - m) θ after every step, m rising LINEARLY from 0.996 to 1.0 over training
  (official ``momentum_scheduler``: m_i = m_0 + i (m_1 - m_0) / (ipe · epochs · ipe_scale), i the
  update index from 0).

Defaults (official ``configs/in1k_vith14_ep300.yaml`` with ``src/train.py``, ``src/helper.py``,
``src/transforms.py``): ViT-H/14 at 224 px (the paper's main model), predictor 384 wide, depth 12,
as many heads as the encoder, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, trunc-normal(0.02)
init; batch 2048; AdamW (betas 0.9/0.999) lr 1e-3 after 40 warm-up epochs from 2e-4, cosine to
1e-6, not scaled with the batch; weight decay 0.04 -> 0.4 (cosine), none on biases and 1-d
parameters; no gradient clipping; bf16; 300 epochs; views: RandomResizedCrop(224, scale 0.3-1.0)
only (no flip, no colour jitter, no blur). The official evaluation average-pools the target
encoder's last-layer patch tokens.

Implementation notes and departures. Our ViT (``backbones.vit``) has a CLS token and the official
I-JEPA ViT has none: the CLS token goes through both encoders (it attends to the patches and they
to it) but its output is dropped, so neither the predictor nor the loss sees it. The backbone is
re-initialized as the official encoder (trunc-normal(0.02) Linear and patch-embedding weights)
instead of the ViT's MAE init. ``encode`` is the backbone's pooled output: with
``backbone.pool: mean`` (set in the recipes) the average of the final-normed patch tokens, the
official evaluation feature; it reads the context encoder, and ``method.eval_encoder: target``
reads the EMA target encoder as the official evaluation does; ``selfsup export`` writes the one
``encode`` reads. Masks (see ``multiblock_masking``): block positions range over the whole grid
(the official ``randint(0, H - h)`` never reaches the last row and column, which pins a 13x13
context block to the top-left corner of a 14x14 grid), and ``min_keep`` binds the context only
(the official collator also demands it of each target block, which never ends on small grids).
The masks are cut to the shortest in each rank's batch (the official collator: in each GPU's
batch of 128). The lr warm-up is the official one, linear from ``start_lr`` 2e-4 to 1e-3: both
recipes set ``optim.warmup_start_lr: 2.0e-4``, where the trainer's schedule starts (not scaled
with the batch; the I-JEPA kNN rows of BENCHMARKS.md, run on 2026-11-29 and 30, warmed up from 0).
Masks come from the global RNG the trainer seeds per step, so a resumed run draws the same ones.
The collapse monitor watches the mean of the context tokens;
``metrics["ijepa/target_token_std"]`` is the mean over features of the target tokens' standard
deviation across the batch (0 when every patch of every image maps to the same vector).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfsup.backbones.vit import sincos_2d_pos_embed
from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import ijepa_loss
from selfsup.modalities.image import ImageMethod
from selfsup.nn.predictors import JEPAPredictor, gather_tokens, official_init_
from selfsup.nn.teacher import LinearEMATarget, check_linear_ema_target, make_teacher
from selfsup.pretext.masking import multiblock_masking
from selfsup.registry import register_method


@dataclass
class IJEPAConfig(MethodConfig):
    name: str = "ijepa"
    pred_dim: int = 384
    pred_depth: int = 12
    pred_heads: int | None = None  # None: as many as the encoder (official)
    pred_mlp_ratio: float = 4.0
    pred_drop_path: float = 0.0
    n_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10  # fewest patches a block may have
    ema: tuple[float, float] = (0.996, 1.0)  # target-encoder momentum, linear from the first to the second
    ipe_scale: float = 1.0  # the momentum schedule spans ipe_scale x the run (official knob)
    eval_encoder: str = "context"  # encode() with the context encoder or the EMA "target" encoder

    def validate(self) -> None:
        if min(self.pred_dim, self.pred_depth, self.n_targets) < 1:
            raise ConfigError("method.pred_dim, pred_depth and n_targets must be >= 1")
        if self.pred_heads is not None and self.pred_heads < 1:
            raise ConfigError(f"method.pred_heads={self.pred_heads}: must be >= 1 (or null: the encoder's)")
        for key in ("target_scale", "context_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"method.{key}={getattr(self, key)}: needs 0 < min <= max <= 1")
        for key in ("target_aspect", "context_aspect"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi:
                raise ConfigError(f"method.{key}={getattr(self, key)}: needs 0 < min <= max")
        if self.min_keep < 1:
            raise ConfigError(f"method.min_keep={self.min_keep}: must be >= 1")
        check_linear_ema_target(self)
        if self.pred_drop_path < 0 or self.pred_drop_path >= 1:
            raise ConfigError(f"method.pred_drop_path={self.pred_drop_path}: must be in [0, 1)")


@register_method
class IJEPA(LinearEMATarget, ImageMethod):
    name = "ijepa"
    paper = "Assran et al. 2023, Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture"
    family = "masked"
    Config = IJEPAConfig

    def __init__(self, cfg: IJEPAConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        if not hasattr(backbone, "tokens"):
            raise ConfigError("ijepa needs a token ViT backbone (vit_tiny, vit_small, vit_base, vit_large)")
        if len(self.views) != 1 or len(self.local_views):
            raise ConfigError(f"ijepa trains on one view of each image; augment has {len(self.views)} views "
                              f"and {len(self.local_views)} local crops")
        self.grid = tuple(backbone.grid_size)
        side = augment.views[0].size
        if (side // backbone.patch_size,) * 2 != self.grid:
            raise ConfigError(f"ijepa: the {side}-px view gives a {side // backbone.patch_size}-patch grid side, "
                              f"the backbone was built for {self.grid} (set backbone.img_size={side})")
        heads = cfg.pred_heads or backbone.num_heads
        if cfg.pred_dim % heads or cfg.pred_dim % 4:
            raise ConfigError(f"method.pred_dim={cfg.pred_dim}: must be a multiple of 4 (2-D sin-cos) and of "
                              f"the {heads} predictor heads")
        official_init_(backbone.model)  # instead of the ViT's MAE init; CLS token and positions kept
        self.predictor = JEPAPredictor(sincos_2d_pos_embed(cfg.pred_dim, *self.grid), backbone.out_dim, cfg.pred_dim,
                                       cfg.pred_depth, heads, cfg.pred_mlp_ratio, cfg.pred_drop_path)
        self.target_backbone = make_teacher(self.backbone, no_drop_path=True)  # no stochastic depth in the target

    def masks(self, batch: int, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        c = self.cfg
        return multiblock_masking(batch, self.grid, n_targets=c.n_targets, target_scale=tuple(c.target_scale),
                                  target_aspect=tuple(c.target_aspect), context_scale=tuple(c.context_scale),
                                  context_aspect=tuple(c.context_aspect), min_keep=c.min_keep, device=device)

    @torch.no_grad()
    def targets(self, x: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
        """(M·B, Kt, d): the target encoder's layer-normed (no affine) patch tokens of each block."""
        h = self.target_backbone.tokens(x)[:, 1:]  # drop the CLS token
        h = F.layer_norm(h, (h.shape[-1],))
        return torch.cat([gather_tokens(h, t) for t in blocks])

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        (x,) = self.make_views(batch)
        context, blocks = self.masks(x.shape[0], x.device)
        kt = min(t.shape[1] for t in blocks)  # one length for all blocks (the official cut)
        blocks = [t[:, :kt] for t in blocks]
        h = self.targets(x, blocks)
        z = self.backbone.tokens(x, keep=context)[:, 1:]  # context tokens, CLS dropped
        pred = self.predictor(z, context, blocks)
        loss = ijepa_loss(pred, h)
        with torch.no_grad():
            spread = h.float().std(dim=0).mean() if h.shape[0] > 1 else h.new_zeros(())
        metrics = {"ijepa/context_patches": float(context.shape[1]), "ijepa/target_patches": float(kt),
                   "ijepa/target_token_std": spread}
        return StepOutput(loss=loss, metrics=metrics, embeddings=z.mean(dim=1).detach())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.export_backbone()(x)
