"""Audio encoders: a ViT on log-mel spectrogram patches (Audio-MAE's encoder, Huang et al. 2022).

:class:`AudioViT` is the image :class:`~selfsup.backbones.vit.ViT` (timm names, token dropping, mask
tokens, every layer's output) built for one-channel ``(frames, n_mels)`` inputs, time first as
Audio-MAE lays them out, with the spectrogram front end beside it:

1. ``spectrogram(wave)``: (B, 1, samples) waveforms at ``sample_rate`` -> Kaldi log-mel filterbanks
   (``selfsup.nn.spectrogram.kaldi_fbank``: 25 ms frames every 10 ms, ``n_mels`` filters), frames padded
   at the end to a multiple of the patch with the log energy of silence (Audio-MAE pads with 0 before
   normalizing, a loud value; zero samples give silence, so ours reads as the padded audio would), then
   normalized as Audio-MAE does, ``(x - mean) / (2 std)``, with the mean and std of the training
   recordings' log-mels (``spec_norm``, measured when the run starts; Audio-MAE hard-codes AudioSet's
   -4.27 / 4.57);
2. the ViT on (B, 1, frames, n_mels): patches row-major over (time, frequency), fixed 2-D sin-cos
   positions of (time, frequency) (Audio-MAE's ``get_2d_sincos_pos_embed_flexible`` code lays its grid out
   as (frequency, time) while its tokens are time-major; each token still gets a distinct code, so this
   is a relabelling, not a change of what the model can express).

The pooled feature is the mean of the final-normed patch tokens with ``backbone.pool: mean`` (Audio-MAE's
``global_pool`` for fine-tuning; the audio recipes set it, since Audio-MAE's local decoder never reads the
CLS token), else the CLS token (the default of every ViT). ``forward`` takes either a waveform
(B, 1, samples) or a spectrogram (B, 1, frames, n_mels) already prepared by ``spectrogram``, so an
exported encoder (``selfsup.export.load_encoder``) encodes raw audio itself.

Sizes: ``audio_vit_tiny`` 192 wide x 12 blocks x 3 heads, ``audio_vit_small`` 384/12/6, ``audio_vit_base``
768/12/12 (Audio-MAE's ViT-B); ``backbone.patch_size`` (default 16), ``n_mels`` (128), ``depth``,
``embed_dim``, ``num_heads`` as for the image ViTs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfsup.backbones.vit import VIT_SIZES, ViT
from selfsup.config import BackboneConfig
from selfsup.errors import ConfigError
from selfsup.nn.spectrogram import LOG_FLOOR, fbank_frames, kaldi_fbank
from selfsup.registry import register_backbone

__all__ = ["AudioViT", "AUDIO_VIT_SIZES", "spectrogram_shape"]

AUDIO_VIT_SIZES = {f"audio_{name}": size for name, size in VIT_SIZES.items() if name != "vit_large"}


def spectrogram_shape(samples: int, sample_rate: int, n_mels: int, patch: int) -> tuple[int, int]:
    """(frames, n_mels) of the encoder's input: the clip's fbank frames rounded up to a multiple of the patch."""
    frames = fbank_frames(samples, sample_rate)
    if frames < 1:
        raise ConfigError(f"a clip of {samples} samples at {sample_rate} Hz is shorter than one 25 ms frame")
    if n_mels % patch:
        raise ConfigError(f"backbone.n_mels={n_mels} is not a multiple of backbone.patch_size={patch}")
    return -(-frames // patch) * patch, n_mels


class AudioViT(ViT):
    """A ViT on normalized log-mel spectrograms (B, 1, frames, n_mels), with its front end (``spectrogram``)."""

    loads_whole = True  # an exported encoder is loaded with its front end: raw waveforms in

    def __init__(self, *, sample_rate: int, clip_samples: int, n_mels: int = 128, spec_norm: tuple[float, float] = (0.0, 0.5),
                 patch_size: int = 16, **vit: object) -> None:
        frames, mels = spectrogram_shape(clip_samples, sample_rate, n_mels, patch_size)
        super().__init__(img_size=(frames, mels), patch_size=patch_size, in_chans=1, **vit)
        self.sample_rate, self.clip_samples, self.n_mels = sample_rate, clip_samples, n_mels
        self.frames = frames
        self.spec_mean, self.spec_std = float(spec_norm[0]), float(spec_norm[1])

    def spectrogram(self, wave: Tensor) -> Tensor:
        """(B, C, samples) or (B, samples) waveforms (channels averaged) -> (B, 1, frames, n_mels) float32,
        normalized; clips of another length give another number of frames (padded to the patch)."""
        if wave.dim() == 3:
            wave = wave.mean(dim=1)
        if wave.dim() != 2:
            raise ValueError(f"audio must be (B, C, samples) or (B, samples), got {tuple(wave.shape)}")
        spec = kaldi_fbank(wave, self.sample_rate, num_mel_bins=self.n_mels)  # (B, T, F)
        frames = -(-spec.shape[1] // self.patch_size) * self.patch_size
        if frames > spec.shape[1]:
            pad = spec.new_full((spec.shape[0], frames - spec.shape[1], spec.shape[2]), LOG_FLOOR)
            spec = torch.cat([spec, pad], dim=1)
        return ((spec - self.spec_mean) / (2 * self.spec_std)).unsqueeze(1)

    def inputs(self, x: Tensor) -> Tensor:
        """The ViT's input for a waveform batch or an already prepared spectrogram batch."""
        return x if x.dim() == 4 else self.spectrogram(x)

    def tokens(self, x: Tensor, *args, **kwargs):  # noqa: D102 - ViT.tokens on a waveform or a spectrogram
        return super().tokens(self.inputs(x), *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool_tokens(self.tokens(x))


def _build(size: str, cfg: BackboneConfig) -> AudioViT:
    dim, depth, heads = AUDIO_VIT_SIZES[size]
    dim = cfg.embed_dim or dim
    heads = cfg.num_heads or heads
    if cfg.sample_rate is None or cfg.max_len is None:
        raise ConfigError(f"backbone {size} needs backbone.sample_rate and backbone.max_len (the clip's samples); "
                          "an audio run fixes them from its data")
    if dim % heads:
        raise ConfigError(f"backbone: embed_dim {dim} is not divisible by num_heads {heads}")
    if cfg.pos_embed != "sincos" and cfg.pos_embed != "learned":
        raise ConfigError(f"backbone.pos_embed={cfg.pos_embed}: audio ViTs take sincos or learned")
    return AudioViT(sample_rate=cfg.sample_rate, clip_samples=cfg.max_len, n_mels=cfg.n_mels,
                    spec_norm=tuple(cfg.spec_norm or (0.0, 0.5)), patch_size=cfg.patch_size or 16, embed_dim=dim,
                    depth=cfg.depth or depth, num_heads=heads, pos_embed=cfg.pos_embed, pool=cfg.pool,
                    drop_path=cfg.drop_path, grad_checkpointing=cfg.grad_checkpointing, layer_scale=cfg.layer_scale)


for _size in AUDIO_VIT_SIZES:
    register_backbone(_size, modality="audio")(lambda cfg, _s=_size: _build(_s, cfg))
