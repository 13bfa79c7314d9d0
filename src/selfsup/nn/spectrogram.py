"""Log-mel filterbank features computed in batches on the training device.

``kaldi_fbank`` is Kaldi's ``compute-fbank-feats`` as ``torchaudio.compliance.kaldi.fbank``
computes it, which is what Audio-MAE (Huang et al. 2022) feeds its ViT::

    torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True, sample_frequency=sr, use_energy=False,
                                      window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)

with the remaining Kaldi defaults: 25 ms frames every 10 ms, only whole frames (``snip_edges``),
each frame's DC offset removed, pre-emphasis 0.97 (the first sample against itself), a symmetric
Hann window, zero padding to the next power of two, the power spectrum, triangular filters equally
spaced on Kaldi's mel scale ``1127 ln(1 + f / 700)`` between 20 Hz and the Nyquist frequency, and
``log(max(energy, eps))`` with float32's eps. torchaudio is not needed (its releases stop at
torch 2.11); ``tests/test_audio.py`` checks this against a frame-by-frame NumPy computation.

The waveform scale is the one ``soundfile`` / ``torchaudio.load`` return (floats in [-1, 1]),
so the log energies are those Audio-MAE's normalization constants were measured on.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from selfsup.losses._precision import autocast_off

__all__ = ["LOG_FLOOR", "fbank_frames", "kaldi_fbank", "kaldi_mel_banks", "mel_scale"]

LOG_FLOOR = math.log(torch.finfo(torch.float32).eps)  # the log energy of a silent frame (-15.94)


def mel_scale(freq: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's (HTK's) mel scale: ``1127 ln(1 + f / 700)``."""
    if torch.is_tensor(freq):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


@lru_cache(maxsize=16)
def kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> torch.Tensor:
    """(num_bins, padded_window // 2 + 1) float32 triangular filters on the rfft bins, as Kaldi's
    ``MelBanks`` (no VTLN warp): filter m rises linearly in mel from ``left_m`` to ``centre_m`` and falls
    to ``right_m``, the edges equally spaced in mel between ``low_freq`` and ``high_freq`` (<= 0: that
    much below Nyquist); the Nyquist bin has no weight."""
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0.0 <= low_freq < high <= nyquist:
        raise ValueError(f"mel filters need 0 <= low_freq ({low_freq}) < high_freq ({high}) <= Nyquist ({nyquist})")
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    m = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left, centre, right = mel_low + m * delta, mel_low + (m + 1) * delta, mel_low + (m + 2) * delta
    fft_bins = padded_window // 2
    mel = mel_scale(torch.arange(fft_bins, dtype=torch.float64) * (sample_rate / padded_window)).unsqueeze(0)
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1)).float()  # the Nyquist bin: no filter reaches it


def fbank_frames(samples: int, sample_rate: float, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> int:
    """Frames ``kaldi_fbank`` makes of ``samples`` samples (whole frames only; 0 when shorter than one)."""
    win = int(sample_rate * frame_length_ms * 0.001)
    hop = int(sample_rate * frame_shift_ms * 0.001)
    return 0 if samples < win else 1 + (samples - win) // hop


def kaldi_fbank(wave: torch.Tensor, sample_rate: float, *, num_mel_bins: int = 128, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0, preemphasis: float = 0.97, low_freq: float = 20.0,
                high_freq: float = 0.0) -> torch.Tensor:
    """Log-mel filterbank energies of a batch of mono waveforms.

    Args:
        wave: (..., S) float waveforms at ``sample_rate`` (any leading dims, e.g. (B, S)).
        num_mel_bins: mel filters (Audio-MAE: 128).
    Returns: (..., T, num_mel_bins) float32, T = 1 + (S - win) // hop frames, time first as
    Audio-MAE reads its inputs. Computed in float32 whatever the autocast state.
    """
    win = int(sample_rate * frame_length_ms * 0.001)
    hop = int(sample_rate * frame_shift_ms * 0.001)
    if wave.shape[-1] < win:
        raise ValueError(f"a waveform of {wave.shape[-1]} samples is shorter than one {frame_length_ms} ms frame "
                         f"({win} samples at {sample_rate} Hz)")
    padded = 1 << (win - 1).bit_length()  # round_to_power_of_two
    lead = wave.shape[:-1]
    with autocast_off(wave):
        x = wave.reshape(-1, wave.shape[-1]).float()
        frames = x.unfold(-1, win, hop)  # (N, T, win), snip_edges
        frames = frames - frames.mean(dim=-1, keepdim=True)  # remove_dc_offset
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # Kaldi: x[0] - c x[0]
        frames = frames - preemphasis * previous
        window = torch.hann_window(win, periodic=False, dtype=torch.float64, device=wave.device).float()
        power = torch.fft.rfft(frames * window, n=padded).abs().pow(2)  # (N, T, padded/2 + 1)
        banks = kaldi_mel_banks(num_mel_bins, padded, float(sample_rate), float(low_freq), float(high_freq))
        energies = power @ banks.to(wave.device).t()
        logs = energies.clamp_min(torch.finfo(torch.float32).eps).log()
    return logs.reshape(*lead, *logs.shape[-2:])
