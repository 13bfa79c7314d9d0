"""V-JEPA and V-JEPA 2 (both registered here: one objective, two recipes). V-JEPA (Bardes, Garrido, Ponce, Chen, Rabbat, LeCun, Assran, Ballas 2024, "Revisiting Feature Prediction for
Learning Visual Representations from Video", TMLR), as the official facebookresearch/jepa ``app/vjepa/train.py``
with ``src/models/predictor.py`` and ``configs/pretrain/vitl16.yaml``.

Feature prediction in space and time: from the visible part of a clip, predict what an EMA target encoder makes
of the hidden part. Per batch of clips x (B, 3, T, H, W) cut into 2 x 16 x 16 tubelets (a (T', H', W') grid):

1. masks (``pretext.video_masking.multiblock3d_masking``): for each of the mask configs, blocks spanning every
   frame are hidden, their union is the target set and its complement the context (``method.blocks``: the
   paper's short-range 8 blocks of 15% of the frame and long-range 2 blocks of 70%, aspect 0.75-1.5); with
   ``method.max_temporal_keep`` < 1 (the official option, 1 in the paper) every time slice after the first
   int(T' x keep) is a target too, so the context never sees the end of the clip (future prediction; the
   official truncation of every target to the batch's shortest keeps the lowest indices, so some of those late
   tokens can drop out of the loss, as in the official code);
2. target: the EMA encoder reads the whole clip; its output tokens are layer-normed over the features without
   an affine map, s = LN(f_θ̄(x)), and those at the config's target indices are its targets;
3. context: per config, the encoder f_θ reads only the context tubelets (token dropping), z = f_θ(x_ctx);
4. predictor g_φ (``nn.predictors.JEPAPredictor``): Linear(D -> D_p) on z plus fixed 3-D sin-cos positions
   (uniform power) of the context tokens; one learned mask token per config (zero-initialized, the official
   ``use_mask_tokens``, ``zero_init_mask_tokens``) plus the positions of that config's target tokens;
   ``pred_depth`` pre-norm blocks with the encoder's number of heads, LayerNorm, Linear(D_p -> D): ŝ;
5. loss (``losses.jepa_l1_loss``, the official ``loss_fn`` with ``loss_exp`` 1): per config the mean of
   |ŝ - s| over target tokens and features, averaged over the configs;
6. after every step θ̄ <- m θ̄ + (1 - m) θ, m linear from 0.998 to 1 over ``ipe_scale`` = 1.25 x the run.

Defaults (``configs/pretrain/vitl16.yaml``): ViT-L/16, 16 frames every 4 at 224 px, tubelet 2, 3-D sin-cos
positions with uniform power, predictor 12 x 384, AdamW, weight decay 0.04 -> 0.4 (cosine), lr 2e-4 -> 6.25e-4
over 40 warm-up epochs then cosine to 1e-6, gradient clipping 10 (after warm-up), batch 24 x 128 GPUs, 300
epochs of 300 iterations on VideoMix2M, random resized crop scale (0.3, 1.0) aspect (0.75, 1.35), bf16.
Published (attentive probe, frozen ViT-L/16): Kinetics-400 80.8, Something-Something v2 69.5.

``encode`` and ``selfsup export`` read the EMA target encoder (``method.eval_encoder: target``, the encoder the
official evaluations load); ``eval_encoder: context`` reads the trained one. The collapse monitor watches the
mean context token; ``metrics["vjepa/target_token_std"]`` is the mean over features of the targets' standard
deviation across tokens (0 when every tubelet maps to one vector).

V-JEPA 2 (Assran, Bardes, Fan, Garrido, Howes, Muckley, Rizvi, Roberts, Sinha, Zholus et al. 2025, "V-JEPA 2:
Self-Supervised Video Models Enable Understanding, Prediction and Planning"; official facebookresearch/vjepa2,
``configs/train/vitg16/pretrain-256px-16f.yaml``) is registered here as ``vjepa2``: the same objective, masks and
loss, with

- 3-D rotary positions in every attention of the encoder (``backbone.pos_embed: rope``, ``backbones.video.rope_3d``,
  the official ``RoPEAttention`` with its tiled-frequency quirk) and of the predictor (:class:`RoPEPredictor`:
  no additive table; context and mask tokens rotated by their own (t, h, w)), the predictor with 12 heads;
- a constant EMA momentum 0.99925 (``ema: [0.99925, 0.99925]``);
- the schedule of its recipes (``optim.schedule: wsd``): lr warmed up linearly 1e-4 -> 5.25e-4 over 12,000 steps,
  then constant; weight decay 0.04 constant; the "cooldown" of the paper (a linear lr decay over the last 12,000
  steps, with longer clips (64 frames) and, for ViT-g, a higher resolution) is ``optim.cooldown_epochs`` in one run
  at one resolution here (progressive resolution, a curriculum across runs, is not built);
- ViT-g/16 at 256 px, 16 frames at 4 fps, batch 3072 in the paper (``configs/vjepa2/vitl16.yaml`` keeps every setting
  on ViT-L/16, the largest registered size). Published: SSv2 attentive probe 77.3 (ViT-g/384).

Departures: the official code draws each config's block size from a generator seeded with the step and the
block positions from the global one; here both come from the trainer's seeded global generator (so resuming
replays them). The official regularizer ``reg_coeff`` is 0 in every released config and is not built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.backbones.video import Block, grid_coords
from selfsup.core.method import StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import jepa_l1_loss
from selfsup.modalities.video import VideoMethod, VideoMethodConfig
from selfsup.nn.positions import sincos_3d_pos_embed
from selfsup.nn.predictors import JEPAPredictor, gather_tokens, official_init_
from selfsup.nn.teacher import LinearEMATarget, check_linear_ema_target, make_teacher
from selfsup.pretext.video_masking import VJEPA_ASPECT, multiblock3d_masking
from selfsup.registry import register_method


@dataclass
class VJEPAConfig(VideoMethodConfig):
    name: str = "vjepa"
    # mask configs: [number of blocks, spatial scale] each (paper: short-range 8 x 0.15, long-range 2 x 0.7)
    blocks: list = field(default_factory=lambda: [[8, 0.15], [2, 0.7]])
    aspect: tuple[float, float] = VJEPA_ASPECT
    temporal_scale: tuple[float, float] = (1.0, 1.0)  # blocks' share of the clip's time slices
    # the official max_temporal_keep: the context keeps only the first int(t x this) time slices, every later slice
    # is a target (< 1: predict the future as well as the hidden blocks; 1: the paper's)
    max_temporal_keep: float = 1.0
    pred_dim: int = 384
    pred_depth: int = 12
    pred_heads: int | None = None  # default: the encoder's
    ema: tuple[float, float] = (0.998, 1.0)
    ipe_scale: float = 1.25
    eval_encoder: str = "target"

    def validate(self) -> None:
        super().validate()
        if not self.blocks or any(len(b) != 2 or int(b[0]) < 1 or not 0.0 < float(b[1]) <= 1.0 for b in self.blocks):
            raise ConfigError(f"method.blocks={self.blocks}: a list of [number of blocks >= 1, spatial scale in (0, 1]]")
        if min(self.pred_dim, self.pred_depth) < 1 or (self.pred_heads is not None and self.pred_heads < 1):
            raise ConfigError("method.pred_dim, pred_depth and pred_heads must be >= 1")
        if not 0.0 < self.max_temporal_keep <= 1.0:
            raise ConfigError(f"method.max_temporal_keep={self.max_temporal_keep}: must be in (0, 1]")
        if self.pred_dim % 2:
            raise ConfigError(f"method.pred_dim={self.pred_dim}: must be even (sin-cos positions)")
        check_linear_ema_target(self)


@register_method
class VJEPA(LinearEMATarget, VideoMethod):
    name = "vjepa"
    paper = "Bardes et al. 2024, Revisiting Feature Prediction for Learning Visual Representations from Video"
    family = "masked"
    Config = VJEPAConfig

    def __init__(self, cfg: VJEPAConfig, backbone, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        if backbone.attention != "joint":
            raise ConfigError(f"{self.name}'s context encoder reads part of the clip: it needs backbone.attention=joint")
        heads = cfg.pred_heads or backbone.num_heads
        if cfg.pred_dim % heads:
            raise ConfigError(f"method.pred_dim={cfg.pred_dim} is not a multiple of the predictor's {heads} heads "
                              "(method.pred_heads)")
        self.predictor = self.build_predictor(heads)
        self.target_backbone = make_teacher(self.backbone)
        self.masks(1, backbone.grid_size, torch.device("cpu"))  # refuses blocks that leave no context, now

    def build_predictor(self, heads: int) -> nn.Module:
        c, b = self.cfg, self.backbone
        return JEPAPredictor(sincos_3d_pos_embed(c.pred_dim, *b.grid_size), b.embed_dim, c.pred_dim, c.pred_depth,
                             heads, norm_eps=1e-6, mask_token_std=0.0, num_mask_tokens=len(c.blocks))

    def masks(self, batch: int, grid: tuple[int, int, int], device: torch.device):
        c = self.cfg
        return multiblock3d_masking(batch, grid, blocks=[(int(n), float(s)) for n, s in c.blocks],
                                    aspect=tuple(c.aspect), temporal_scale=tuple(c.temporal_scale),
                                    max_temporal_keep=c.max_temporal_keep, device=device)

    def predict(self, x: torch.Tensor, context: torch.Tensor, target: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions (B, Kt, D) of the target tokens, context tokens (B, Kc, D)) for one mask config."""
        z = self.backbone.tokens(x, keep=context)
        return self.predictor(z, context, [target], mask_index=index), z

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> StepOutput:
        x = self.views(batch)
        grid = self.backbone.grid_of(x)
        masks = self.masks(x.shape[0], grid, x.device)
        with torch.no_grad():
            h = self.target_backbone.tokens(x)
            h = F.layer_norm(h, (h.shape[-1],))
        loss, spread, pooled = 0.0, 0.0, None
        for i, m in enumerate(masks):
            target = gather_tokens(h, m.target)
            pred, z = self.predict(x, m.context, m.target, i)
            loss = loss + jepa_l1_loss(pred, target)
            with torch.no_grad():
                spread += float(target.float().flatten(0, 1).std(dim=0).mean())
                pooled = z.detach().mean(1) if pooled is None else pooled
        n = len(masks)
        return StepOutput(loss / n, {f"{self.name}/target_token_std": spread / n}, embeddings=pooled)


class RoPEPredictor(nn.Module):
    """V-JEPA 2's predictor (``src/models/predictor.py`` with ``use_rope``): Linear(enc_dim -> pred_dim) on the context
    tokens, one learned mask token per mask config (zero-initialized) at each target token, ``depth`` pre-norm blocks
    whose attention rotates queries and keys by each token's (t, h, w) (``backbones.video.rope_3d``), LayerNorm,
    Linear(pred_dim -> enc_dim) on the target tokens. No additive positions. (The official code sorts the
    concatenated tokens by index first; attention without a mask is order-free, so the outputs are the same.)"""

    def __init__(self, grid: tuple[int, int, int], enc_dim: int, pred_dim: int, depth: int, heads: int,
                 num_mask_tokens: int) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.embed = nn.Linear(enc_dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(num_mask_tokens, 1, pred_dim))
        self.blocks = nn.ModuleList(Block(pred_dim, heads, 4.0, 0.0, False, None) for _ in range(depth))
        self.norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.proj = nn.Linear(pred_dim, enc_dim)
        official_init_(self)  # the official init_video_model: trunc-normal(0.02) Linear, LayerNorm 1 / 0

    def forward(self, ctx: torch.Tensor, ctx_idx: torch.Tensor, targets: list[torch.Tensor],
                mask_index: int = 0) -> torch.Tensor:
        target = torch.cat(targets)  # (M·B, Kt), block-major as JEPAPredictor
        n = len(targets)
        x = self.embed(ctx).repeat(n, 1, 1)
        queries = self.mask_token[mask_index % self.mask_token.shape[0]].to(x.dtype).expand(target.shape[0], target.shape[1], -1)
        x = torch.cat([x, queries], dim=1)
        coords = grid_coords(torch.cat([ctx_idx.repeat(n, 1), target], dim=1), self.grid)
        for block in self.blocks:
            x = block(x, coords)
        return self.proj(self.norm(x)[:, ctx.shape[1]:])


@dataclass
class VJEPA2Config(VJEPAConfig):
    name: str = "vjepa2"
    pred_heads: int | None = 12
    ema: tuple[float, float] = (0.99925, 0.99925)


@register_method
class VJEPA2(VJEPA):
    name = "vjepa2"
    paper = "Assran et al. 2025, V-JEPA 2: Self-Supervised Video Models Enable Understanding, Prediction and Planning"
    family = "masked"
    Config = VJEPA2Config

    def __init__(self, cfg: VJEPA2Config, backbone, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        if backbone.pos_embed_type != "rope":
            raise ConfigError(f"vjepa2 encodes positions with 3-D RoPE: set backbone.pos_embed=rope (got "
                              f"{backbone.pos_embed_type})")

    def build_predictor(self, heads: int) -> nn.Module:
        c, b = self.cfg, self.backbone
        if (c.pred_dim // heads) < 6:
            raise ConfigError(f"vjepa2's RoPE predictor needs at least 6 channels per head; method.pred_dim={c.pred_dim} "
                              f"over {heads} heads (method.pred_heads) gives {c.pred_dim // heads}")
        return RoPEPredictor(b.grid_size, b.embed_dim, c.pred_dim, c.pred_depth, heads, len(c.blocks))
