"""VideoMAE (Tong, Song, Wang, Wang 2022, "VideoMAE: Masked Autoencoders are Data-Efficient Learners for
Self-Supervised Video Pre-Training", NeurIPS), as the official MCG-NJU/VideoMAE ``modeling_pretrain.py`` /
``engine_for_pretraining.py``.

MAE on clips with an extremely high ratio of tube masking:

1. the clip (B, 3, T, H, W) is cut into 2 x 16 x 16 tubelets (``backbones.video``), a (T/2, H/16, W/16) grid;
2. **tube masking** (``pretext.video_masking.tube_masking``): per clip one random set of int(ρ·(H/16)(W/16))
   spatial positions (ρ = 0.9: 176 of 196) is hidden in every time slice, so a hidden patch cannot be copied from
   the same place in a neighbouring frame (the paper's "temporal redundancy" argument); ``method.mask: random``
   (unstructured, paper Table 1b) and ``future`` (the last ``future_slices`` time slices, future prediction)
   are options;
3. the ViT encoder reads the visible tubelets only (token dropping), no mask tokens;
4. the decoder: ``Linear(D -> D_d, bias=False)`` on the encoded tokens plus the decoder's fixed positions of
   their tubelets, one learned mask token (trunc-normal 0.02) plus the position of each hidden tubelet,
   ``decoder_depth`` pre-norm blocks, LayerNorm, ``Linear(D_d -> 2·16·16·3)``; only the hidden tubelets are
   predicted (the official ``return_token_num``);
5. target (``videomae_targets``): the crop's pixels in [0, 1] (the official code un-normalizes the input),
   each tubelet's t·p·p values of each colour channel normalized by their own mean and unbiased std,
   ``(x - μ) / (σ + 1e-6)`` (``normlize_target``, on by default), laid out (frame, row, column, channel);
6. loss: the mean squared error over the hidden tubelets' values.

Defaults (paper sec. 4, ``run_mae_pretraining.py`` and ``scripts/*/pretrain.sh``): ViT-B/16, 16 frames every 4
(Kinetics-400, UCF101; every 2 on Something-Something v2), 224 px, mask ratio 0.9 (0.75 on UCF101), decoder 4
blocks x 384 wide x 6 heads (ViT-B; ViT-S: 4 x 192 x 3), AdamW betas (0.9, 0.95), weight decay 0.05, lr 1.5e-4 x
batch / 256 with batch 2048 (UCF101: 3e-4 x 192 / 256), 40 warm-up epochs from 0 then cosine to 1e-5 (scaled), no
gradient clipping; 1600 epochs on K400, 2400 on SSv2, 3200 on UCF101; augmentation ``GroupMultiScaleCrop(224,
[1, .875, .75, .66])`` and flip. Published (ViT-B fine-tuning top-1, the README of July 2022 with those epochs):
K400 80.9 (16 x 5 x 3 test views), SSv2 70.6 (16 x 2 x 3), UCF101 from scratch 90.8 (the current README gives
81.5, 70.8 and 91.3 for later runs). ``configs/videomae/k400.yaml`` is the K400 recipe,
``configs/videomae/embedded_cpu.yaml`` a CPU-sized run on the embedded clips.

Departures, both deliberate and written here: the encoder's and decoder's positions are V-JEPA's fixed 3-D
sin-cos table (VideoMAE uses a fixed 1-D sinusoid over the flattened tubelet index, sines and cosines
interleaved), so that VideoMAE and V-JEPA
train the same encoder; the training crop is ``VideoMethod``'s random resized crop (V-JEPA's scale and aspect
by default) instead of VideoMAE's ``GroupMultiScaleCrop``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.backbones.video import Block
from selfsup.core.method import StepOutput
from selfsup.errors import ConfigError
from selfsup.modalities.video import VideoMethod, VideoMethodConfig, normalize_clips
from selfsup.nn.positions import sincos_3d_pos_embed
from selfsup.nn.predictors import gather_tokens
from selfsup.pretext.masking import MaskSet, random_masking
from selfsup.pretext.video_masking import future_masking_3d, tube_masking
from selfsup.registry import register_method

MASKS = ("tube", "random", "future")


@dataclass
class VideoMAEConfig(VideoMethodConfig):
    name: str = "videomae"
    mask_ratio: float = 0.9
    mask: str = "tube"  # tube (paper) | random | future (the last future_slices time slices hidden)
    future_slices: int = 1
    decoder_dim: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 6
    norm_pix_loss: bool = True  # the official normlize_target

    def validate(self) -> None:
        super().validate()
        if self.mask not in MASKS:
            raise ConfigError(f"method.mask={self.mask!r}: must be one of {', '.join(MASKS)}")
        if self.mask != "future" and not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio={self.mask_ratio}: must be in (0, 1)")
        if self.future_slices < 1:
            raise ConfigError(f"method.future_slices={self.future_slices}: must be >= 1")
        if min(self.decoder_dim, self.decoder_depth, self.decoder_heads) < 1 or self.decoder_dim % self.decoder_heads:
            raise ConfigError("method.decoder_dim, decoder_depth and decoder_heads must be >= 1, decoder_dim a multiple "
                              "of decoder_heads")


def videomae_targets(patches: torch.Tensor, channels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """VideoMAE's normalized targets: patches (B, N, t·p·p·C) of pixels in [0, 1], laid out (…, channel last),
    each tubelet's values of each channel standardized by their own mean and unbiased std, ``(x - μ) / (σ + eps)``
    (``engine_for_pretraining``: ``images_squeeze.mean(dim=-2)`` / ``.var(dim=-2, unbiased=True).sqrt() + 1e-6``)."""
    b, n, d = patches.shape
    x = patches.view(b, n, d // channels, channels)
    x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + eps)
    return x.view(b, n, d)


class VideoMAEDecoder(nn.Module):
    """VideoMAE's ``PretrainVisionTransformerDecoder`` with its ``encoder_to_decoder`` and mask token: predicts the
    pixels of the hidden tubelets only (see the module docstring, step 4)."""

    def __init__(self, enc_dim: int, patch_dim: int, grid: tuple[int, int, int], dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_3d_pos_embed(dim, *grid), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, 0.0, False, None) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, patch_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, keep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """latent (B, K, D) encoded visible tokens at ``keep`` (B, K) -> (B, M, patch_dim) at ``hidden`` (B, M)."""
        pos = self.pos_embed.expand(latent.shape[0], -1, -1).to(latent.dtype)
        x = self.embed(latent) + gather_tokens(pos, keep)
        queries = self.mask_token.to(x.dtype) + gather_tokens(pos, hidden)
        x = torch.cat([x, queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -hidden.shape[1]:]))


@register_method
class VideoMAE(VideoMethod):
    name = "videomae"
    paper = "Tong et al. 2022, VideoMAE: Masked Autoencoders are Data-Efficient Learners"
    family = "masked"
    Config = VideoMAEConfig
    figures = ("reconstruction",)

    def __init__(self, cfg: VideoMAEConfig, backbone, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        if backbone.attention != "joint":
            raise ConfigError("videomae drops the hidden tubelets from the encoder: it needs backbone.attention=joint")
        b = backbone
        patch_dim = b.tubelet_size * b.patch_size * b.patch_size * b.in_chans
        self.decoder = VideoMAEDecoder(b.embed_dim, patch_dim, b.grid_size, cfg.decoder_dim, cfg.decoder_depth,
                                       cfg.decoder_heads)
        self.masks(1, b.grid_size, torch.device("cpu"))  # refuses a ratio that hides all or no tubelets, now

    def masks(self, batch: int, grid: tuple[int, int, int], device: torch.device) -> MaskSet:
        c = self.cfg
        if c.mask == "tube":
            return tube_masking(batch, grid, c.mask_ratio, device=device)
        if c.mask == "future":
            return future_masking_3d(batch, grid, c.future_slices, device=device)
        masks = random_masking(batch, grid[0] * grid[1] * grid[2], c.mask_ratio, device=device)
        if masks.keep.shape[1] == 0 or masks.masked.shape[1] == 0:
            raise ConfigError(f"videomae: method.mask_ratio={c.mask_ratio} hides all or none of the tubelets")
        return masks

    def masked_forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MaskSet, torch.Tensor]:
        """crops: (B, 3, T, S, S) in [0, 1]. Returns (pred (B, M, P), target (B, M, P), masks, latent (B, K, D))."""
        x = normalize_clips(crops)
        grid = self.backbone.grid_of(x)
        masks = self.masks(x.shape[0], grid, x.device)
        latent = self.backbone.tokens(x, keep=masks.keep)
        pred = self.decoder(latent, masks.keep, masks.masked)
        with torch.no_grad():
            pixels = self.backbone.patchify(crops.float())
            if self.cfg.norm_pix_loss:
                pixels = videomae_targets(pixels, self.backbone.in_chans)
            target = gather_tokens(pixels, masks.masked)
        return pred, target, masks, latent

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> StepOutput:
        pred, target, _, latent = self.masked_forward(self.crops(batch))
        loss = F.mse_loss(pred.float(), target)
        return StepOutput(loss=loss, embeddings=self.backbone.pool_tokens(latent).detach())

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For ``selfsup report``: normalized clips (as ``preprocess`` makes them) -> (the clips with hidden tubelets
        set to NaN, the reconstruction with the visible tubelets pasted back), both in [0, 1] RGB, (B, 3, T, H, W).
        With ``norm_pix_loss`` each predicted tubelet is put back at the mean and std of each colour channel over
        the clip's visible tubelets, never its own."""
        from selfsup.pretext.augment import IMAGENET_MEAN, IMAGENET_STD

        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1, 1)
        crops = (x * std + mean).clamp(0, 1)
        pred, _, masks, _ = self.masked_forward(crops)
        pixels = self.backbone.patchify(crops)
        full = pixels.clone()
        hidden = gather_tokens(pixels, masks.masked)
        pred = pred.float()
        if self.cfg.norm_pix_loss:  # each channel's mean and std over the clip's visible tubelets, never the hidden ones
            c = self.backbone.in_chans
            visible = gather_tokens(pixels, masks.keep).view(pixels.shape[0], -1, c)
            mu, sd = visible.mean(dim=1, keepdim=True), visible.std(dim=1, keepdim=True)  # (B, 1, C)
            pred = (pred.view(*hidden.shape[:2], -1, c) * sd.unsqueeze(1) + mu.unsqueeze(1)).view_as(hidden)
        idx = masks.masked.unsqueeze(-1).expand(-1, -1, pixels.shape[-1])
        full.scatter_(1, idx, pred.clamp(0, 1))
        masked = pixels.scatter(1, idx, torch.full_like(hidden, float("nan")))
        return self.backbone.unpatchify(masked), self.backbone.unpatchify(full)
