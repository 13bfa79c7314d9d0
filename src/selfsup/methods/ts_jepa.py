"""TS-JEPA: a joint-embedding predictive architecture for time series (Ennadir, Golkar, Sarra 2024,
"Joint Embedding go Temporal", NeurIPS Workshop on Time Series in the Age of Large Models; official
``Sennadir/TS_JEPA``), the design documents' time-series JEPA.

Masked modelling in representation space: from the visible patches of a series, predict what an EMA
target encoder makes of the hidden ones. Per batch of windows x (B, C, T):

1. each channel is instance-normalized (RevIN without affine) and cut into N patches of P steps (the
   encoder's patching), and every channel sequence is a sample of its own (channel independence; the
   official code is univariate);
2. per channel sequence, M = N - int(N (1 - r)) patches are hidden, r = 0.7 (the official loader:
   ``random.sample`` of int(N r) patches; ``method.mask: block | future`` hides contiguous spans of
   ``mask_span`` patches or the last M, from ``pretext.masking``);
3. target: the EMA encoder reads every patch; its output tokens are layer-normed over the features
   without an affine map, s_j = LN(f_θ̄(x))_j, and those at the hidden patches are the targets;
4. context: the encoder f_θ reads only the visible patches, each with its own position (token
   dropping), z = f_θ(x_visible);
5. predictor g_φ (``nn.predictors.JEPAPredictor``, TS-JEPA's ``Predictor``): Linear(D -> D_p) on z plus
   fixed 1-D sin-cos positions of the visible patches, one learned mask token (initialized to zero)
   plus the sin-cos position of each hidden patch appended, ``pred_depth`` pre-norm blocks, LayerNorm,
   Linear(D_p -> D): ŝ_j at every hidden patch j;
6. loss (``losses.jepa_l1_loss``, the official ``loss_pred``): L = (1 / (M d)) Σ_j Σ_k |ŝ_{j,k} - s_{j,k}|,
   averaged over the channel sequences;
7. after every step θ̄ <- m θ̄ + (1 - m) θ, m rising linearly from 0.998 to 1 over ``ipe_scale`` x the
   run (the official ``ema_scheduler`` with ipe_scale 1.25, so m reaches 0.9996 when training stops;
   the official m moves once per epoch, here once per step as I-JEPA's).

Defaults (the paper's command in the official README and ``config_pretrain.py``): windows of 320 steps
in patches of 32 (10 patches), mask ratio 0.7, encoder D = 128 with 2 heads and 1 block, predictor 128
wide with 2 heads and 1 block, batch 32, AdamW, EMA 0.998, ipe_scale 1.25, gradient clipping 10
(``config_pretrain``'s, which its training loop does not apply), trunc-normal(0.02) init of every
Linear. Its encoder evaluates with the context encoder (``method.eval_encoder: context``).

Departures. The encoder is selfsup's PatchTST encoder (``backbone: patchtst``: Linear patch embedding,
learned positions, BatchNorm post-norm blocks, the same encoder PatchTST's masked reconstruction trains),
so that the two objectives are compared on one architecture; the official encoder embeds each patch
with a strided Conv1d (kernel 3) then a Linear, adds fixed sin-cos positions and runs pre-norm
LayerNorm blocks with a final LayerNorm. Its data loader z-scores the whole series once; here each
window is instance-normalized first, as every series method in selfsup, with statistics over all its
steps, hidden ones included (as PatchTST's masking): the context encoder sees the window's mean and
scale, never a hidden value. The official lr (6e-5 in
``config_pretrain``, 1e-7 in the README command, decayed linearly to half per epoch) is tuned to its
5,000 epochs; the recipes use selfsup's warm-up and cosine schedule sized for their runs.

``encode`` is the pooled encoder feature (each channel's patch tokens averaged, channels side by side),
of the context encoder, or of the EMA target with ``method.eval_encoder: target``; ``selfsup eval
forecast`` reads the same encoder's flattened patch tokens. The collapse monitor watches the mean
context token of each channel sequence; ``metrics["ts_jepa/target_token_std"]`` is the mean over
features of the targets' standard deviation across tokens (0 when all patches map to one vector).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.backbones.series import instance_norm
from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import jepa_l1_loss
from selfsup.modalities.series import SeriesMethod
from selfsup.nn.positions import sincos_1d_pos_embed
from selfsup.nn.predictors import JEPAPredictor, gather_tokens, official_init_
from selfsup.nn.teacher import LinearEMATarget, check_linear_ema_target, make_teacher
from selfsup.pretext.masking import check_sequence_mask, masked_count, sequence_mask, sequence_mask_indices
from selfsup.registry import register_method


@dataclass
class TSJEPAConfig(MethodConfig):
    name: str = "ts_jepa"
    mask_ratio: float = 0.7  # fraction of each channel's patches hidden (paper: 0.7)
    mask: str = "random"  # random (paper) | block (spans of mask_span patches) | future (the last patches)
    mask_span: int = 3  # block: patches per span
    pred_dim: int = 128
    pred_depth: int = 1
    pred_heads: int = 2
    pred_mlp_ratio: float = 4.0
    ema: tuple[float, float] = (0.998, 1.0)  # target-encoder momentum, linear from the first to the second
    ipe_scale: float = 1.25  # the momentum schedule spans ipe_scale x the run (official)
    eval_encoder: str = "context"  # encode() with the context encoder (official) or the EMA "target"

    def validate(self) -> None:
        check_sequence_mask(self.mask_ratio, self.mask, self.mask_span)
        if min(self.pred_dim, self.pred_depth, self.pred_heads) < 1:
            raise ConfigError("method.pred_dim, pred_depth and pred_heads must be >= 1")
        if self.pred_dim % self.pred_heads or self.pred_dim % 2:
            raise ConfigError(f"method.pred_dim={self.pred_dim}: must be even (sin-cos positions) and a multiple "
                              f"of method.pred_heads={self.pred_heads}")
        check_linear_ema_target(self)


@register_method
class TSJEPA(LinearEMATarget, SeriesMethod):
    name = "ts_jepa"
    paper = "Ennadir et al. 2024, Joint Embedding go Temporal (TS-JEPA)"
    family = "masked"
    Config = TSJEPAConfig

    def __init__(self, cfg: TSJEPAConfig, backbone: nn.Module, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        self.require_patch_encoder()
        if masked_count(backbone.patches, cfg.mask_ratio) >= backbone.patches:
            raise ConfigError(f"ts_jepa: method.mask_ratio={cfg.mask_ratio} hides all {backbone.patches} patches")
        official_init_(backbone.model)  # TS-JEPA's init_weights: trunc-normal(0.02) Linear weights, zero biases
        self.predictor = JEPAPredictor(sincos_1d_pos_embed(cfg.pred_dim, backbone.patches), backbone.embed_dim,
                                       cfg.pred_dim, cfg.pred_depth, cfg.pred_heads, cfg.pred_mlp_ratio,
                                       norm_eps=1e-5, mask_token_std=0.0)
        self.target_backbone = make_teacher(self.backbone)

    def masks(self, sequences: int, patches: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(visible (S, K), hidden (S, M)) patch indices, ascending, of S channel sequences of N patches."""
        c = self.cfg
        mask = sequence_mask(c.mask, sequences, patches, c.mask_ratio, span=c.mask_span, device=device)
        return sequence_mask_indices(mask, masked_count(patches, c.mask_ratio))

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> StepOutput:
        x = self.preprocess(batch)
        patches = self.backbone.patchify(instance_norm(x)[0])  # (B, C, N, P)
        b, ch, n, _ = patches.shape
        keep, hidden = self.masks(b * ch, n, x.device)
        with torch.no_grad():
            h = self.target_backbone.encode_patches(patches).flatten(0, 1)  # (B·C, N, D)
            target = gather_tokens(F.layer_norm(h, (h.shape[-1],)), hidden)
        z = self.backbone.encode_patches(patches, keep=keep.view(b, ch, -1)).flatten(0, 1)  # (B·C, K, D)
        pred = self.predictor(z, keep, [hidden])
        loss = jepa_l1_loss(pred, target)
        with torch.no_grad():
            spread = target.float().flatten(0, 1).std(dim=0).mean()
        return StepOutput(loss, {"ts_jepa/target_token_std": spread}, embeddings=z.detach().mean(1))
