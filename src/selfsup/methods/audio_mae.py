"""Audio-MAE (Huang, Xu, Li, Baevski, Auli, Galuba, Metze, Feichtenhofer 2022, "Masked Autoencoders
that Listen", NeurIPS), as the official facebookresearch/AudioMAE ``models_mae.py`` / ``main_pretrain.py``.

MAE on log-mel spectrograms: the clip's Kaldi filterbank (128 mel bins, 25 ms frames every 10 ms, time
first, normalized ``(x - mean) / (2 std)``; ``selfsup.backbones.audio``) is cut into p x p patches
(16 x 16; (time, frequency) row-major), a random 80% of them is hidden (unstructured masking, which
the paper finds best for pre-training), the ViT encodes the visible 20% with the CLS token, and a
decoder reconstructs every patch:

    L = Σ_{b,i} m_{b,i} ||ŷ_{b,i} - (x_{b,i} - μ_{b,i}) / sqrt(σ²_{b,i} + 1e-6)||² / P / Σ m     (norm_pix_loss)

the MSE over the masked patches only (``losses.mae_loss``, the image MAE's loss).

Decoder (``decoder_mode``): ``local`` (the paper's and the official default, ``decoder_mode=1``): the
encoder output embedded to 512, mask tokens, unshuffled, fixed 2-D sin-cos positions, the CLS token
dropped, then 16 Swin blocks (the V2-CR blocks the official code patches into timm: post-norm, scaled
cosine attention; 16 heads, window 4 x 4 patches, the odd blocks shifted by 2 patches along time only) on the (time, frequency) patch grid, LayerNorm and
a linear prediction of each patch's p·p values; ``global``: the image MAE's decoder of plain ViT blocks
(the official ``decoder_mode=0`` has 8 x 512: set ``decoder_depth: 8``; ``decoder_depth`` counts the blocks
of either decoder and defaults to the local decoder's 16).

Augmentation: ``roll_mag_aug`` (on in the official AudioSet-2M pre-training script): each waveform is
rolled circularly by a uniform random number of samples and scaled by a gain ~ Beta(10, 10) + 0.5;
ours rolls within the recording's own samples, so the zero padding of a short clip stays at the end.
No mixup and no SpecAugment in pre-training.

Defaults (paper sec. 4.1, ``submit_pretrain_audioset2M.sh``): ViT-B/16 encoder, mask ratio 0.8,
``norm_pix_loss`` on, AdamW betas (0.9, 0.95), weight decay 1e-4 (``main_pretrain.py`` default 0.05),
base lr 2e-4 x batch / 256 with batch 512, 3 warm-up epochs then half-cycle cosine, 33 epochs on
AudioSet-2M (10 s clips, 1024 frames x 128 mel bins). The paper reports 47.3 mAP on AudioSet-2M after
fine-tuning (README). ``configs/audio_mae/audioset.yaml`` is that recipe; ``configs/audio_mae/fsdd_cpu.yaml``
a CPU-sized run on the embedded spoken digits.

Differences, all deliberate: the encoder's positions are laid out (time, frequency) where the official
code's ``PatchEmbed_org`` numbers its grid (frequency, time) (a relabelling of distinct codes); frames
beyond the clip are padded with silence's log energy, not 0 (see ``backbones.audio``); the
normalization constants are measured on the run's training data (Audio-MAE hard-codes each dataset's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import mae_loss
from selfsup.losses.reconstruction import patch_stats
from selfsup.modalities.audio import AudioMethod
from selfsup.nn.decoders import LocalDecoder, MAEDecoder
from selfsup.pretext.masking import random_masking, visible_estimate
from selfsup.registry import register_method


@dataclass
class AudioMAEConfig(MethodConfig):
    name: str = "audio_mae"
    mask_ratio: float = 0.8
    decoder_mode: str = "local"  # local (Swin windows, official decoder_mode=1) | global (plain ViT blocks)
    decoder_dim: int = 512
    decoder_depth: int = 16  # local: 16 Swin blocks (official); global: the image MAE's 8
    decoder_heads: int = 16
    window: tuple[int, int] = (4, 4)  # local decoder: attention window in patches (time, frequency)
    shift: tuple[int, int] = (2, 0)  # local decoder: shift of the odd blocks' windows (time only)
    norm_pix_loss: bool = True
    roll_mag_aug: bool = True

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio={self.mask_ratio}: must be in (0, 1)")
        if self.decoder_mode not in ("local", "global"):
            raise ConfigError(f"method.decoder_mode={self.decoder_mode!r}: must be local or global")
        if min(self.decoder_dim, self.decoder_depth, self.decoder_heads, *self.window) < 1 or min(self.shift) < 0:
            raise ConfigError("method.decoder_dim, decoder_depth, decoder_heads and window must be >= 1, shift >= 0")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"method.decoder_dim={self.decoder_dim} must be divisible by "
                              f"method.decoder_heads={self.decoder_heads}")


def roll_mag(wave: torch.Tensor, length: torch.Tensor | None = None) -> torch.Tensor:
    """Audio-MAE's ``roll_mag_aug`` on a batch (B, C, S): each clip's first ``length`` samples (all S
    without lengths) rolled circularly by a uniform random shift, the whole clip scaled by Beta(10, 10) + 0.5."""
    b, _, s = wave.shape
    n = torch.full((b,), s, device=wave.device) if length is None else length.to(wave.device).clamp(1, s)
    shift = (torch.rand(b, device=wave.device) * n).long()
    t = torch.arange(s, device=wave.device).unsqueeze(0)
    src = torch.where(t < n.unsqueeze(1), (t - shift.unsqueeze(1)) % n.unsqueeze(1), t)  # out[t] = in[t - shift]
    rolled = torch.gather(wave, 2, src.unsqueeze(1).expand(-1, wave.shape[1], -1))
    gain = torch.distributions.Beta(torch.tensor(10.0, device=wave.device), torch.tensor(10.0, device=wave.device))
    return rolled * (gain.sample((b,)) + 0.5).view(b, 1, 1).to(wave.dtype)


@register_method
class AudioMAE(AudioMethod):
    name = "audio_mae"
    paper = "Huang et al. 2022, Masked Autoencoders that Listen"
    family = "masked"
    Config = AudioMAEConfig
    figures = ("reconstruction",)  # selfsup report: spectrograms, masked inputs, reconstructions

    def __init__(self, cfg: AudioMAEConfig, backbone, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        backbone.mask_token.requires_grad_(False)  # MAE drops masked patches: the ViT's mask token is unused
        p = backbone.patch_size
        args = (backbone.embed_dim, p * p * backbone.in_chans, tuple(backbone.grid_size), cfg.decoder_dim,
                cfg.decoder_depth, cfg.decoder_heads)
        if cfg.decoder_mode == "local":
            self.decoder = LocalDecoder(*args, window=tuple(cfg.window), shift=tuple(cfg.shift))
        else:
            self.decoder = MAEDecoder(*args)

    def masked_forward(self, spec: torch.Tensor, mask_ratio: float | None = None):
        """spec: normalized (B, 1, frames, n_mels). Returns (pred (B, N, p*p), target (B, N, p*p), masks,
        latent (B, 1+K, D))."""
        grid = self.backbone.grid_of(spec)
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        masks = random_masking(spec.shape[0], grid[0] * grid[1], ratio, device=spec.device)
        latent = self.backbone.tokens(spec, keep=masks.keep)
        pred = self.decoder(latent, masks.ids_restore, grid)
        return pred, self.backbone.patchify(spec), masks, latent

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        batch = self.check(batch)
        wave = batch["audio"]
        if self.cfg.roll_mag_aug and self.training:
            wave = roll_mag(wave if wave.dim() == 3 else wave.unsqueeze(1), batch.get("length"))
        pred, target, masks, latent = self.masked_forward(self.backbone.spectrogram(wave))
        loss = mae_loss(pred, target, masks.mask, norm_pix_loss=self.cfg.norm_pix_loss)
        return StepOutput(loss=loss, embeddings=self.backbone.pool_tokens(latent).detach())

    @torch.no_grad()
    def reconstruct(self, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For ``selfsup report``: normalized spectrograms (B, 1, frames, n_mels) -> (the input with its
        hidden patches set to NaN, drawn blank; the reconstruction with the visible patches pasted back),
        in the same normalized space. With ``norm_pix_loss`` each predicted patch is put back at the mean
        and std of the visible patches around it (``pretext.masking.visible_estimate``), never its own."""
        pred, target, masks, _ = self.masked_forward(spec)
        hidden = masks.mask.unsqueeze(-1)
        pred, target = pred.float(), target.float()
        grid = self.backbone.grid_of(spec)
        if self.cfg.norm_pix_loss:
            mean, std = patch_stats(target)
            pred = pred * visible_estimate(std, masks.mask, grid) + visible_estimate(mean, masks.mask, grid)
        masked = torch.where(hidden, torch.full_like(target, float("nan")), target)
        recon = torch.where(hidden, pred, target)
        return self.backbone.unpatchify(masked, grid=grid), self.backbone.unpatchify(recon, grid=grid)
