"""Audio data: recordings decoded once, resampled, cut to one clip length, held in memory.

Sources (``data.source``):

- ``embedded-audio``: the Free Spoken Digit Dataset (Jackson et al., github.com/Jakobovski/free-spoken-digit-dataset,
  CC BY-SA 4.0): 3,000 mono 8 kHz WAV recordings of the spoken digits 0-9 by 6 speakers, shipped inside the package
  as the original ``fsdd-recordings.tar.gz``, unmodified (``data/embedded/FSDD-LICENSE`` beside it);
- a folder (searched recursively) or a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive of audio files: WAV, FLAC, OGG,
  MP3, AIFF, anything libsndfile reads through ``soundfile``; any sample rate, mono or multi-channel.

Labels and splits, the first that applies:

1. file names of the FSDD pattern ``{digit}_{speaker}_{index}.wav``: the label is the digit (``data.label_column:
   speaker`` for the speaker), the official split: indices 0-4 are the test set, 5-49 the training set;
2. a manifest ``labels.csv`` (or ``metadata.csv``) beside the files: a file column (``file``, ``filename``, ``path``
   or the first column), a label column (``data.label_column``, else ``label`` / ``class`` / ``category``) and an
   optional ``split`` column (``train`` / ``val`` / ``test``); files it does not list are left out and counted;
3. folders: ``train/``, ``val/``, ``test/`` at the top give the split, and the folder under them (or the top folder
   when there are no split folders) the class;
4. otherwise a fixed fifth of the files (by a hash of their name) is the test split, and the run's first line says so.

Every recording is mixed down to mono, resampled to ``data.sample_rate`` (default: the rate most files have) with a
polyphase windowed-sinc filter (``scipy.signal.resample_poly``), its DC offset removed (Audio-MAE's loader subtracts
the mean), then cut or zero-padded at the end to ``data.clip_seconds`` (default: the shortest multiple of 0.25 s that
holds 95% of the training recordings, at most 10 s). Files that cannot be read or hold no samples are skipped and
counted. A batch is ``audio`` (B, 1, samples) float32 with ``labels``, ``index`` and ``length`` (the samples that are
recording, not padding); the log-mel spectrogram is computed from it on the training device
(``selfsup.nn.spectrogram``).

The decoded set lives in memory (3,000 FSDD clips of 1 s at 8 kHz are 96 MB); a set whose clips would not fit the
memory budget is refused with what it would need.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from selfsup.data.layout import SPLIT_DIRS, Layout, folder_layout, manifest_layout
from selfsup.errors import ConfigError, DataError

EMBEDDED_AUDIO = "embedded-audio"
EMBEDDED_AUDIO_FILE = Path(__file__).resolve().parent / "embedded" / "fsdd-recordings.tar.gz"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MANIFESTS = ("labels.csv", "metadata.csv")
FILE_COLUMNS = ("file", "filename", "path", "audio")
FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
FSDD_TEST_INDICES = 5  # the official split: recordings 0-4 of each speaker and digit are the test set
MAX_DEFAULT_CLIP_S = 10.0
DEFAULT_CLIP_QUANTILE = 0.95


def _name(source: str) -> str:
    return source.strip()


def is_audio_source(source: str) -> bool:
    """Whether ``source`` names audio (cheap: names, and a folder's first few entries)."""
    text = _name(source)
    if text.lower() == EMBEDDED_AUDIO:
        return True
    path = Path(text).expanduser()
    if path.name.lower().endswith(ARCHIVE_SUFFIXES) and path.is_file():
        return _archive_has_audio(path)
    if path.is_dir():
        for i, f in enumerate(path.rglob("*")):
            if f.suffix.lower() in AUDIO_SUFFIXES:
                return True
            if i > 2000:
                break
    return False


def _archive_has_audio(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tar:
            for i, member in enumerate(tar):
                if member.isfile() and member.name.lower().endswith(AUDIO_SUFFIXES):
                    return True
                if i > 50:
                    break
    except (tarfile.TarError, OSError, EOFError):
        return False
    return False


# --------------------------------------------------------------------------------------
# reading


@dataclass
class Recording:
    name: str  # path inside the folder or archive, '/'-separated
    wave: np.ndarray | None  # (samples,) float32 mono at the native rate; None when unreadable
    rate: int
    error: str = ""


def _decode(name: str, data: bytes | Path) -> Recording:
    import soundfile as sf

    try:
        raw, rate = sf.read(io.BytesIO(data) if isinstance(data, bytes) else str(data), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - libsndfile raises many kinds; each is a counted skip
        return Recording(name, None, 0, f"unreadable ({type(exc).__name__})")
    if raw.shape[0] == 0:
        return Recording(name, None, int(rate), "no samples")
    wave = raw.mean(axis=1) if raw.shape[1] > 1 else raw[:, 0]
    if not np.isfinite(wave).all():
        return Recording(name, None, int(rate), "non-finite samples")
    return Recording(name, np.ascontiguousarray(wave, dtype=np.float32), int(rate))


def _source_path(source: str) -> Path:
    text = _name(source)
    if text.lower() == EMBEDDED_AUDIO:
        if not EMBEDDED_AUDIO_FILE.is_file():
            raise DataError(f"the embedded audio set is missing from the package ({EMBEDDED_AUDIO_FILE}); reinstall selfsup")
        return EMBEDDED_AUDIO_FILE
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"{text}: no such folder or archive of audio files")
    return path


@lru_cache(maxsize=4)
def _read_source(path_str: str, mtime_ns: int) -> tuple[tuple[Recording, ...], dict[str, str]]:
    """Every recording of a folder or archive at its native rate, in name order, and the manifests'
    text by name (``labels.csv`` / ``metadata.csv`` anywhere in it)."""
    path = Path(path_str)
    recordings: list[Recording] = []
    manifests: dict[str, str] = {}
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            rel = f.relative_to(path).as_posix()
            if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES:
                recordings.append(_decode(rel, f))
            elif f.is_file() and f.name.lower() in MANIFESTS:
                manifests[rel] = f.read_text(encoding="utf-8", errors="replace")
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    lower = member.name.lower()
                    if lower.endswith(AUDIO_SUFFIXES):
                        recordings.append(_decode(member.name, tar.extractfile(member).read()))
                    elif Path(lower).name in MANIFESTS:
                        manifests[member.name] = tar.extractfile(member).read().decode("utf-8", errors="replace")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable tar archive ({exc})") from None
        recordings.sort(key=lambda r: r.name)
    if not recordings:
        raise DataError(f"{path}: no audio files ({', '.join(AUDIO_SUFFIXES)}) found")
    return tuple(recordings), manifests


def read_source(source: str) -> tuple[tuple[Recording, ...], dict[str, str]]:
    path = _source_path(source)
    return _read_source(str(path.resolve()), path.stat().st_mtime_ns)


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``wave`` at ``rate`` Hz resampled to ``target`` Hz by polyphase filtering (scipy's default
    Kaiser-windowed sinc, anti-aliased); the same array when the rates agree."""
    if rate == target:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


# --------------------------------------------------------------------------------------
# labels and splits


def _fsdd_layout(names: list[str], label_column: str | None) -> Layout | None:
    parts = [FSDD_NAME.match(Path(n).name) for n in names]
    if not parts or not all(parts):
        return None
    kind = (label_column or "digit").lower()
    if kind not in ("digit", "speaker"):
        raise ConfigError(f"data.label_column={label_column!r}: a spoken-digit set is labeled by digit or speaker")
    split = ["test" if int(m.group(3)) < FSDD_TEST_INDICES else "train" for m in parts]
    labels = [m.group(1) if kind == "digit" else m.group(2) for m in parts]
    return Layout(split, labels, f"FSDD names, labeled by {kind}, official split (indices 0-4 are the test set)",
                  ("digit", "speaker"))


def layout_of(names: list[str], manifests: dict[str, str], label_column: str | None) -> Layout:
    return (_fsdd_layout(names, label_column)
            or manifest_layout(names, manifests, label_column, file_columns=FILE_COLUMNS, items="files", by_basename=True)
            or folder_layout(names, label_column, items="files", manifest="labels.csv"))


# --------------------------------------------------------------------------------------
# the dataset


class AudioClips:
    """Clips held in memory: ``audio`` (N, 1, samples) float32, ``lengths`` (N,) recording samples in each
    clip, ``labels`` (N,) int64 (-1 where unlabeled)."""

    def __init__(self, audio: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor, classes: list[str], *,
                 sample_rate: int, name: str = "", fingerprint: str = "", note: str = "",
                 skipped: int = 0, skip_reasons: dict[str, int] | None = None) -> None:
        self.audio, self.lengths, self.labels, self.classes = audio, lengths, labels, classes
        self.sample_rate = sample_rate
        self.name, self.fingerprint, self.note = name, fingerprint, note
        self.skipped, self.skip_reasons = skipped, dict(skip_reasons or {})

    def __len__(self) -> int:
        return int(self.audio.shape[0])

    @property
    def clip_samples(self) -> int:
        return int(self.audio.shape[-1])

    @property
    def has_labels(self) -> bool:
        return bool(self.classes) and len(self) > 0 and bool((self.labels >= 0).all())

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"audio": self.audio[index], "labels": self.labels[index], "length": self.lengths[index], "index": index}

    def subset(self, keep: torch.Tensor, name: str) -> AudioClips:
        return AudioClips(self.audio[keep], self.lengths[keep], self.labels[keep], self.classes,
                          sample_rate=self.sample_rate, name=name, fingerprint=f"{self.fingerprint}:{name}",
                          note=self.note, skipped=self.skipped, skip_reasons=self.skip_reasons)


@dataclass
class AudioInfo:
    """What a run must fix before its encoder is built: the rate most files have and the default clip length."""

    native_rate: int
    default_clip_seconds: float
    recordings: int


def audio_info(source: str) -> AudioInfo:
    recordings, manifests = read_source(source)
    good = [r for r in recordings if r.wave is not None]
    if not good:
        raise DataError(f"{source}: none of the {len(recordings)} audio files could be read")
    rate = Counter(r.rate for r in good).most_common(1)[0][0]
    layout = layout_of([r.name for r in good], manifests, None)  # only the split matters here
    durations = sorted(len(r.wave) / r.rate for r, s in zip(good, layout.split) if s == "train") or \
        sorted(len(r.wave) / r.rate for r in good)
    q = durations[min(len(durations) - 1, int(DEFAULT_CLIP_QUANTILE * len(durations)))]
    clip = min(MAX_DEFAULT_CLIP_S, max(0.25, math.ceil(q / 0.25) * 0.25))
    return AudioInfo(rate, clip, len(good))


def open_audio(source: str, split: str, *, sample_rate: int, clip_seconds: float, label_column: str | None = None,
               memory_budget_gib: float | None = None) -> AudioClips:
    """Split ``split`` (train | val | test) of ``source`` at ``sample_rate`` Hz, every clip ``clip_seconds`` long."""
    key = split.lower()
    if key not in SPLIT_DIRS:
        raise DataError(f"audio split {split!r}: use train, val or test")
    key = SPLIT_DIRS[key]
    recordings, manifests = read_source(source)
    good = [r for r in recordings if r.wave is not None]
    reasons = Counter(r.error for r in recordings if r.wave is None)
    if not good:
        raise DataError(f"{source}: none of the {len(recordings)} audio files could be read ({dict(reasons)})")
    layout = layout_of([r.name for r in good], manifests, label_column)
    chosen = [i for i, s in enumerate(layout.split) if s == key]
    unlisted = sum(1 for s in layout.split if not s)
    if unlisted:
        reasons["not in the manifest"] += unlisted
    if not chosen:
        have = sorted({s for s in layout.split if s})
        raise DataError(f"{source}: no recordings in the {key} split (it has: {', '.join(have) or 'none'}; {layout.how})")
    clip = int(round(clip_seconds * sample_rate))
    need = len(chosen) * clip * 4 / 2**30
    from selfsup.data.modes import memory_budget

    budget, why = memory_budget(memory_budget_gib)
    if need > budget:
        raise DataError(f"{source}: {len(chosen):,} clips of {clip_seconds} s at {sample_rate} Hz need {need:.1f} GiB, "
                        f"over the {budget:.1f} GiB budget ({why}); audio is held in memory: lower data.clip_seconds "
                        "or data.sample_rate, or raise data.memory_budget_gib")
    names = sorted({layout.labels[i] for i, s in enumerate(layout.split) if s} if layout.labels else set(),
                   key=lambda s: (0, float(s)) if _number(s) else (1, s))
    index = {n: i for i, n in enumerate(names)}
    audio = torch.zeros(len(chosen), 1, clip)
    lengths = torch.zeros(len(chosen), dtype=torch.int64)
    labels = torch.full((len(chosen),), -1, dtype=torch.int64)
    cut = 0
    digest = hashlib.sha256(f"{sample_rate}:{clip}:{label_column}".encode())
    for row, i in enumerate(chosen):
        rec = good[i]
        wave = resample(rec.wave, rec.rate, sample_rate)
        wave = wave - wave.mean()
        n = min(len(wave), clip)
        cut += len(wave) > clip
        audio[row, 0, :n] = torch.from_numpy(wave[:n])
        lengths[row] = n
        if layout.labels:
            labels[row] = index[layout.labels[i]]
        digest.update(rec.name.encode())
        digest.update(rec.wave.tobytes())
    digest.update(labels.numpy().tobytes())
    note = f"; {cut} recordings longer than {clip_seconds} s cut at the end" if cut else ""
    if any(r.rate != sample_rate for r in (good[i] for i in chosen)):
        note += f"; resampled to {sample_rate} Hz"
    what = "embedded FSDD" if _name(source).lower() == EMBEDDED_AUDIO else Path(_name(source)).name
    return AudioClips(audio, lengths, labels, names, sample_rate=sample_rate, name=f"{what} ({key})",
                      fingerprint=digest.hexdigest()[:16], note=f" ({layout.how}){note}",
                      skipped=sum(reasons.values()), skip_reasons=dict(reasons))


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def describe(data: AudioClips) -> str:
    labels = f", {len(data.classes)} classes" if data.classes else ", unlabeled"
    skipped = ""
    if data.skipped:
        skipped = "; skipped " + ", ".join(f"{n} {why}" for why, n in sorted(data.skip_reasons.items()))
    return (f"{len(data):,} clips of {data.clip_samples / data.sample_rate:g} s at {data.sample_rate} Hz, mono, "
            f"from {data.name}{labels}{data.note}{skipped}")


__all__ = ["EMBEDDED_AUDIO", "AudioClips", "AudioInfo", "audio_info", "describe", "is_audio_source", "open_audio",
           "read_source", "resample"]
