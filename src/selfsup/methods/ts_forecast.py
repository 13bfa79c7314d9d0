"""Forecasting as a pretext task: from the past of a window, predict its future, in value space or in
latent space. The design documents' forecasting pretext; value space is the self-supervised use of
PatchTST's forecasting model (Nie et al. 2023, sec. 3.1: the flatten head over a channel's patch
tokens), latent space is the JEPA objective (Assran et al. 2023; TS-JEPA, Ennadir et al. 2024) with the
hidden patches always the last ones.

Per batch of unlabeled windows x (B, C, T), split into a context of T - F steps and the future of the
last F = ``method.horizon`` steps (default: the last quarter of the window's patches):

1. normalization from the context only: every channel minus the context's mean, over its standard
   deviation (RevIN without affine, its statistics read from the T - F context steps), so nothing of
   the future reaches the encoder's input; the window is cut into N patches of P steps, the last
   N_f = F / P of them the future (patches do not overlap: ``backbone.patch_stride`` = ``patch_size``);
2. the encoder f_θ reads the N_c = N - N_f context patches of each channel (channel independence)
   with their own positions: z (B·C, N_c, D);
3. ``method.target: value`` (default): a linear head on the flattened tokens, Linear(N_c · D -> F)
   shared by the channels after dropout (PatchTST's flatten head), predicts the future values ŷ, and
       L = (1 / (B C F)) Σ (ŷ - y)²
   with y the future steps in the context's normalized space;
   ``method.target: latent``: an EMA copy f_θ̄ of the encoder reads all N patches (its tokens are
   layer-normed without affine), a predictor (``nn.predictors.JEPAPredictor``: Linear(D -> D_p) plus
   fixed 1-D sin-cos positions on z, one learned mask token plus the position of each future patch,
   ``pred_depth`` blocks, LayerNorm, Linear(D_p -> D)) predicts the target tokens of the future patches,
       L = (1 / (N_f d)) Σ_j Σ_k |ŝ_{j,k} - s_{j,k}|      (``losses.jepa_l1_loss``, TS-JEPA's loss),
   and θ̄ <- m θ̄ + (1 - m) θ after every step, m linear from 0.998 to 1 over 1.25 x the run (TS-JEPA's).

Defaults: horizon a quarter of the window (rounded to whole patches), head dropout 0.2 (PatchTST's),
latent predictor 128 wide, 2 heads, 1 block (TS-JEPA's). The recipes (``configs/ts_forecast/``) use
the PatchTST encoder; the encoder that ``encode`` reads and ``selfsup export`` writes is f_θ, the one
that reads the past (a full window at evaluation).

``encode`` is the pooled encoder feature (each channel's tokens averaged over the window's patches,
channels side by side). ``selfsup eval forecast`` reads what the pretext forecast from: the flattened
tokens of the last N_c patches of a window, normalized with their own statistics (a whole window would
put tokens at the N_f positions the encoder never saw; an exported encoder reads whole windows). The
collapse monitor watches the mean context token of each channel sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.backbones.series import REVIN_EPS, instance_norm
from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import jepa_l1_loss
from selfsup.modalities.series import SeriesMethod
from selfsup.nn.positions import sincos_1d_pos_embed
from selfsup.nn.predictors import JEPAPredictor
from selfsup.nn.teacher import LinearEMATarget, check_linear_ema_target, make_teacher
from selfsup.registry import register_method


@dataclass
class TSForecastConfig(MethodConfig):
    name: str = "ts_forecast"
    target: str = "value"  # value: the future steps (MSE) | latent: the EMA encoder's future tokens (L1)
    horizon: int | None = None  # future steps F, a multiple of the patch; None: a quarter of the window's patches
    head_dropout: float = 0.2  # value: dropout before the flatten head (PatchTST's head_dropout)
    pred_dim: int = 128  # latent: predictor width, heads, blocks (TS-JEPA's)
    pred_heads: int = 2
    pred_depth: int = 1
    ema: tuple[float, float] = (0.998, 1.0)  # latent: target-encoder momentum, linear from the first to the second
    ipe_scale: float = 1.25  # latent: the momentum schedule spans ipe_scale x the run

    def validate(self) -> None:
        if self.target not in ("value", "latent"):
            raise ConfigError(f"method.target={self.target!r}: must be value or latent")
        if self.horizon is not None and self.horizon < 1:
            raise ConfigError(f"method.horizon={self.horizon}: must be >= 1 step (or null: a quarter of the window)")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"method.head_dropout={self.head_dropout}: must be in [0, 1)")
        if min(self.pred_dim, self.pred_heads, self.pred_depth) < 1 or self.pred_dim % self.pred_heads or self.pred_dim % 2:
            raise ConfigError(f"method.pred_dim={self.pred_dim}, pred_heads={self.pred_heads}, pred_depth="
                              f"{self.pred_depth}: need >= 1 each, an even width divisible by the heads")
        check_linear_ema_target(self)


def context_norm(x: torch.Tensor, context: int) -> torch.Tensor:
    """x (B, C, T) minus the mean, over the standard deviation, of its first ``context`` steps per channel
    (RevIN's statistics from the context alone: the future steps leave the input unchanged)."""
    past = x[..., :context]
    mean = past.mean(-1, keepdim=True)
    std = torch.sqrt(past.var(-1, keepdim=True, unbiased=False) + REVIN_EPS)
    return (x - mean) / std


@register_method
class TSForecast(LinearEMATarget, SeriesMethod):
    name = "ts_forecast"
    paper = "Forecasting pretext: context window -> future window (PatchTST head / JEPA latents)"
    family = "pretext"
    Config = TSForecastConfig

    def __init__(self, cfg: TSForecastConfig, backbone: nn.Module, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        self.require_patch_encoder()
        p = backbone.patch_size
        if backbone.patch_stride != p:
            raise ConfigError(f"ts_forecast needs patches that do not overlap (backbone.patch_stride={backbone.patch_stride} "
                              f"!= patch_size={p}), so that no context patch holds a future step")
        n = backbone.patches
        horizon = cfg.horizon if cfg.horizon is not None else max(1, n // 4) * p
        if horizon % p or not 0 < horizon // p < n:
            raise ConfigError(f"method.horizon={horizon}: must be a multiple of the {p}-step patch, leaving at least one "
                              f"of the window's {n} patches ({backbone.max_len} steps) as context")
        self.horizon, self.future_patches = horizon, horizon // p
        self.context_patches = n - self.future_patches
        if cfg.target == "value":
            self.head = nn.Sequential(nn.Flatten(-2), nn.Dropout(cfg.head_dropout),
                                      nn.Linear(self.context_patches * backbone.embed_dim, horizon))
        else:
            self.predictor = JEPAPredictor(sincos_1d_pos_embed(cfg.pred_dim, n), backbone.embed_dim, cfg.pred_dim,
                                           cfg.pred_depth, cfg.pred_heads, norm_eps=1e-5, mask_token_std=0.0)
            self.target_backbone = make_teacher(self.backbone)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patches (B, C, N, P) of the window normalized with its context's statistics, the future steps
        (B, C, F) in that normalized space). Windows must be the encoder's length (``data.seq_len``)."""
        if x.shape[-1] != self.backbone.max_len:
            raise ConfigError(f"ts_forecast: windows of {x.shape[-1]} steps; the encoder and the horizon were set for "
                              f"{self.backbone.max_len} (data.seq_len)")
        normed = context_norm(x, x.shape[-1] - self.horizon)
        return self.backbone.patchify(normed), normed[..., -self.horizon:]

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> StepOutput:
        x = self.preprocess(batch)
        patches, future = self.split(x)
        b, c, n, _ = patches.shape
        z = self.backbone.encode_patches(patches[:, :, : self.context_patches])  # (B, C, N_c, D): the past only
        embeddings = z.detach().mean(2).flatten(0, 1)
        if self.cfg.target == "value":
            pred = self.head(z)  # (B, C, F)
            loss = F.mse_loss(pred.float(), future.float())
            return StepOutput(loss, {}, embeddings=embeddings)
        ctx = torch.arange(self.context_patches, device=x.device).expand(b * c, -1)
        ahead = torch.arange(self.context_patches, n, device=x.device).expand(b * c, -1)
        with torch.no_grad():
            h = self.target_backbone.encode_patches(patches).flatten(0, 1)[:, self.context_patches:]
            target = F.layer_norm(h, (h.shape[-1],))
        pred = self.predictor(z.flatten(0, 1), ctx, [ahead])
        return StepOutput(jepa_l1_loss(pred, target), {}, embeddings=embeddings)

    def forecast_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``selfsup eval forecast`` reads: the flattened tokens of the window's last N_c patches (the
        context length and positions the encoder forecast from in pretraining; a whole window would put
        tokens at the N_f positions it never saw), normalized with those steps' own statistics."""
        steps = self.context_patches * self.backbone.patch_size
        if x.shape[-1] < steps:
            raise ConfigError(f"ts_forecast: windows of {x.shape[-1]} steps; the encoder forecasts from {steps}")
        normed, mean, std = instance_norm(x[..., -steps:])
        return self.encoder.encode_patches(self.encoder.patchify(normed)).flatten(2), mean, std
