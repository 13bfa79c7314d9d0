"""MAE (He, Chen, Xie, Li, Dollár, Girshick 2022, "Masked Autoencoders Are Scalable Vision
Learners", CVPR).

Mask a large random subset of the image patches, encode only the visible ones, and reconstruct
the pixels of the hidden ones with a light decoder (sec. 3; official ``models_mae.py``):

1. patchify the crop into N patches; per sample, keep a random K = int(N (1 - r)) of them
   (argsort of uniform noise, r = 0.75) — ``pretext.masking.random_masking``;
2. the ViT encoder sees the K visible patch embeddings (+ their positions) and the CLS token only,
   no mask tokens: z = Enc([cls; E x_vis + pos_vis]);
3. the decoder embeds z linearly to its width, appends N - K shared learnable mask tokens,
   unshuffles the sequence back to image order with ``ids_restore``, adds its own fixed 2-D
   sin-cos position embeddings, runs its Transformer blocks, a LayerNorm and a linear
   projection to p·p·3 pixel values per patch; the CLS output is dropped;
4. loss = mean squared error on the masked patches only, against per-patch normalized pixels of
   the (normalized) input crop when ``norm_pix_loss`` (``losses.mae_loss``):

       L = Σ_{b,i} m_{b,i} ||ŷ_{b,i} - (x_{b,i} - μ_{b,i}) / sqrt(σ²_{b,i} + 1e-6)||² / P / Σ m.

Only the encoder is kept for downstream use; ``encode`` is the backbone's pooled output (CLS by
default; the official linear probe reads the CLS token through an extra BatchNorm without affine,
fine-tuning uses global average pooling). The collapse monitor watches the pooled encoding of the
visible tokens (``StepOutput.embeddings``).

Defaults (paper sec. 4 / appendix A.1 and the official ``main_pretrain.py`` / PRETRAIN.md): mask
ratio 0.75; decoder 8 blocks x 512 wide x 16 heads (MLP ratio 4, LayerNorm eps 1e-6, xavier-uniform
linear layers, mask token N(0, 0.02)); ``norm_pix_loss`` on (the code's flag defaults to off, the
recommended command turns it on); AdamW betas (0.9, 0.95), weight decay 0.05 (not on biases and
norms), lr = 1.5e-4 x batch / 256 with batch 4096, 40 warm-up epochs then cosine to 0, 800 epochs
(1600 for the best models: ViT-B 83.6%, ViT-L 85.9% ImageNet fine-tuning top-1); augmentation is
RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip only; no gradient clipping, no
stochastic depth during pre-training.

Implementation notes: the official code masks with the global RNG; ours draws the noise from
the default generator too, which the trainer seeds per step, so resuming replays the same masks.
The view is ``augment.views[0]`` (MAE trains on one view; further views are ignored). The
ViT's own ``mask_token`` (for BEiT-style replacement) is unused and frozen here, so every
trainable parameter gets a gradient, as DDP requires. The
pixel targets are the patchified normalized crop, as the official code (it normalizes with the
ImageNet statistics before the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import mae_loss
from selfsup.losses.reconstruction import patch_stats
from selfsup.modalities.image import ImageMethod
from selfsup.nn.decoders import MAEDecoder
from selfsup.pretext.masking import random_masking, visible_estimate
from selfsup.registry import register_method


@dataclass
class MAEConfig(MethodConfig):
    name: str = "mae"
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio={self.mask_ratio}: must be in (0, 1)")
        if min(self.decoder_dim, self.decoder_depth, self.decoder_heads) < 1:
            raise ConfigError("method.decoder_dim, decoder_depth and decoder_heads must be >= 1")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"method.decoder_dim={self.decoder_dim} must be divisible by "
                              f"method.decoder_heads={self.decoder_heads}")


@register_method
class MAE(ImageMethod):
    name = "mae"
    paper = "He et al. 2022, Masked Autoencoders Are Scalable Vision Learners"
    family = "masked"
    Config = MAEConfig
    single_view = True
    figures = ("reconstruction",)  # selfsup report: originals, masked inputs, reconstructions

    def __init__(self, cfg: MAEConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        if not callable(getattr(backbone, "tokens", None)):
            raise ConfigError("mae needs a token-dropping ViT backbone: backbone.name=vit_tiny, vit_small, "
                              "vit_base or vit_large (timm:* models cannot encode only the visible patches)")
        # MAE drops masked patches instead of replacing them: the ViT's mask token is unused, and
        # freezing it keeps DDP (which expects a gradient for every trainable parameter) happy
        if isinstance(getattr(backbone, "mask_token", None), nn.Parameter):
            backbone.mask_token.requires_grad_(False)
        p = backbone.patch_size
        self.decoder = MAEDecoder(backbone.embed_dim, p * p * 3, tuple(backbone.grid_size), cfg.decoder_dim,
                                  cfg.decoder_depth, cfg.decoder_heads)

    def masked_forward(self, x: torch.Tensor, mask_ratio: float | None = None):
        """Mask, encode the visible patches, decode all. x: normalized (B, 3, H, W).
        Returns (pred (B, N, p*p*3), target (B, N, p*p*3), masks, latent (B, 1+K, D))."""
        gh, gw = self.backbone.grid_of(x)
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        masks = random_masking(x.shape[0], gh * gw, ratio, device=x.device)
        latent = self.backbone.tokens(x, keep=masks.keep)
        pred = self.decoder(latent, masks.ids_restore, (gh, gw))
        return pred, self.backbone.patchify(x), masks, latent

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        x = self.make_views(batch)[0]
        pred, target, masks, latent = self.masked_forward(x)
        loss = mae_loss(pred, target, masks.mask, norm_pix_loss=self.cfg.norm_pix_loss)
        return StepOutput(loss=loss, embeddings=self.backbone.pool_tokens(latent).detach())

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For ``selfsup report``: ``images`` normalized (B, 3, H, W) -> (masked input with hidden
        patches zeroed, reconstruction with the visible patches pasted back), both in the same
        normalized space. With ``norm_pix_loss`` the decoder predicts each patch up to its mean and
        std; those are taken from the visible patches only (the mean statistics of the visible
        patches in its 3x3 neighbourhood, else of the whole image), never from the hidden patch
        itself, which would leak its colour into the picture. (The official demo instead shows a
        model trained without norm_pix_loss.)"""
        pred, target, masks, _ = self.masked_forward(images)
        hidden = masks.mask.unsqueeze(-1)  # (B, N, 1)
        pred = pred.float()
        grid = self.backbone.grid_of(images)
        if self.cfg.norm_pix_loss:
            mean, std = patch_stats(target)
            pred = pred * visible_estimate(std, masks.mask, grid) + visible_estimate(mean, masks.mask, grid)
        target = target.float()
        masked = torch.where(hidden, torch.zeros_like(target), target)
        recon = torch.where(hidden, pred, target)
        return self.backbone.unpatchify(masked, grid=grid), self.backbone.unpatchify(recon, grid=grid)
