"""The audio modality: batches of float waveforms ``audio`` (B, 1, samples) at one sample rate
(``selfsup.data.audio``), turned into normalized log-mel spectrograms on the training device by the
encoder's front end and encoded by a ViT on spectrogram patches (``selfsup.backbones.audio``).

An audio run fixes before its encoder is built (``configure``): ``data.sample_rate`` and
``data.clip_seconds`` (from the data when not given), the encoder's ``backbone.sample_rate`` and
``backbone.max_len`` (the clip's samples), and ``backbone.spec_norm``: the mean and standard deviation of
the training recordings' log-mel energies (the frames that hold recording, not the padding), which
normalize every spectrogram as Audio-MAE's ``(x - mean) / (2 std)``. They are saved with the run, so
evaluation and export read spectrograms exactly as training did.

:class:`AudioMethod` is the base class of every audio method: a batch (or a bare waveform tensor) in,
``preprocess`` gives the normalized spectrogram (B, 1, frames, n_mels), ``encode`` the pooled feature.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from selfsup.core.method import Method
from selfsup.errors import ConfigError
from selfsup.registry import Modality, float_batch, register_modality

BATCH_KEY = "audio"
STATS_CLIPS = 4096  # training clips the spectrogram mean and std are measured on


class AudioMethod(Method):
    """A Method on waveforms (B, C, samples) read through a spectrogram ViT."""

    modalities: ClassVar[tuple[str, ...]] = ("audio",)
    unit: ClassVar[str] = "clips"

    def __init__(self, cfg: Any, backbone: nn.Module, augment: Any = None) -> None:
        super().__init__(cfg, backbone, augment)
        from selfsup.backbones.audio import AudioViT

        if not isinstance(backbone, AudioViT):
            raise ConfigError(f"{self.name} needs an audio encoder (audio_vit_tiny, audio_vit_small, audio_vit_base), "
                              f"got {type(backbone).__name__}")

    def check(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(batch, torch.Tensor):
            batch = {BATCH_KEY: batch}
        float_batch(self.name, self.modalities, BATCH_KEY, batch, (2, 3),
                    "audio batches are float waveforms (B, C, samples)")
        return batch

    def preprocess(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The normalized log-mel spectrograms (B, 1, frames, n_mels) of a batch's waveforms."""
        return self.backbone.spectrogram(self.check(batch)[BATCH_KEY])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features of spectrograms (as ``preprocess`` makes them) or of waveforms."""
        return self.encoder(x)

    def export_note(self) -> str:
        b = self.encoder
        return (f"input: mono float waveforms (B, 1, samples) in [-1, 1] at {b.sample_rate} Hz, clips of "
                f"{b.clip_samples} samples (zero-padded at the end); the encoder computes Kaldi log-mel filterbanks "
                f"({b.n_mels} filters, 25 ms frames every 10 ms, selfsup.nn.spectrogram.kaldi_fbank), normalizes them "
                f"as (x - {b.spec_mean:.4f}) / (2 * {b.spec_std:.4f}) and returns the pooled ViT feature; "
                "load with selfsup.export.load_encoder")


def _claims(source: str) -> bool:
    from selfsup.data.audio import is_audio_source

    return is_audio_source(source)


def spectrogram_stats(source: str, *, sample_rate: int, clip_seconds: float, n_mels: int,
                      label_column: str | None = None, memory_budget_gib: float | None = None) -> list[float]:
    """[mean, std] of the log-mel energies of the training split's recording frames (up to STATS_CLIPS
    clips, evenly spread), as Audio-MAE's normalization constants are measured on its training set."""
    from selfsup.data.audio import open_audio
    from selfsup.nn.spectrogram import fbank_frames, kaldi_fbank

    data = open_audio(source, "train", sample_rate=sample_rate, clip_seconds=clip_seconds, label_column=label_column,
                      memory_budget_gib=memory_budget_gib)
    pick = torch.linspace(0, len(data) - 1, min(len(data), STATS_CLIPS)).round().long().unique()
    total = total_sq = count = 0.0
    for chunk in pick.split(256):
        spec = kaldi_fbank(data.audio[chunk, 0], sample_rate, num_mel_bins=n_mels).double()  # (n, T, F)
        valid = torch.tensor([fbank_frames(int(n), sample_rate) for n in data.lengths[chunk]])
        keep = torch.arange(spec.shape[1]).unsqueeze(0) < valid.unsqueeze(1)  # frames of recording, not padding
        values = spec[keep]
        total += float(values.sum())
        total_sq += float(values.pow(2).sum())
        count += values.numel()
    if count == 0:
        raise ConfigError(f"{source}: no training recording is as long as one 25 ms frame")
    mean = total / count
    std = max(total_sq / count - mean * mean, 1e-12) ** 0.5
    return [round(mean, 6), round(std, 6)]


def _configure(cfg: Any) -> Any:
    """Fix the sample rate, clip length and spectrogram statistics from the data (kept where already set)."""
    b, d = cfg.backbone, cfg.data
    if b.sample_rate is not None and b.max_len is not None and b.spec_norm is not None \
            and d.sample_rate is not None and d.clip_seconds is not None:
        return cfg
    rate, clip = d.sample_rate or b.sample_rate, d.clip_seconds
    if clip is None and b.max_len is not None and rate:
        clip = b.max_len / rate
    if rate is None or clip is None:
        from selfsup.data.audio import audio_info

        info = audio_info(d.source)
        rate, clip = rate or info.native_rate, clip or info.default_clip_seconds
    norm = b.spec_norm or spectrogram_stats(d.source, sample_rate=rate, clip_seconds=clip, n_mels=b.n_mels,
                                            label_column=d.label_column, memory_budget_gib=d.memory_budget_gib)
    return replace(cfg, data=replace(d, sample_rate=rate, clip_seconds=clip),
                   backbone=replace(b, sample_rate=rate, max_len=int(round(clip * rate)), in_chans=1, spec_norm=norm))


def _open(cfg: Any, split: str, evaluation: bool = False) -> Any:
    from selfsup.data.audio import audio_info, describe, open_audio
    from selfsup.data.modes import OpenedData

    d = cfg.data
    rate, clip = d.sample_rate, d.clip_seconds
    if rate is None or clip is None:
        info = audio_info(d.source)
        rate, clip = rate or info.native_rate, clip or info.default_clip_seconds
    data = open_audio(d.source, split, sample_rate=rate, clip_seconds=clip, label_column=d.label_column,
                      memory_budget_gib=d.memory_budget_gib)
    return OpenedData(data, "memory", describe(data))


AUDIO = register_modality(Modality("audio", (BATCH_KEY,), _claims, _open,
                                   "float waveforms (B, 1, samples); folders or tar archives of WAV/FLAC/OGG/MP3, "
                                   "embedded-audio (spoken digits)", configure=_configure))

__all__ = ["AUDIO", "AudioMethod", "spectrogram_stats"]
