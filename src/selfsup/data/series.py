"""Time-series data: long multivariate series cut into windows, and labeled sets of series.

Sources (``data.source``):

- ``embedded-series``: ETTh1 (Zhou et al. 2021, "Informer"; 17,420 hourly rows x 7 variables of an
  electricity transformer, CC BY-ND 4.0), shipped inside the package gzip-compressed and otherwise
  unmodified (``data/embedded/ETTh1.csv.gz`` decompresses to the original file byte for byte;
  ``ETDataset-LICENSE`` beside it);
- a CSV file (``.csv`` or ``.csv.gz``) holding one long multivariate series, one row per time step,
  a header line naming the columns; non-numeric columns (the ``date``) are left out; or the same table
  as Parquet (``.parquet``, read with ``pyarrow``: ``pip install selfsup[parquet]``), its integer and
  floating-point columns the variables;
- a set of series: a ``.npy`` array (N, T) or (N, C, T), a ``.npz`` with ``x`` and optional labels
  ``y`` (or ``x_train`` / ``y_train`` / ``x_test`` / ``y_test``), a UCR/UEA ``.ts`` file, a folder
  holding ``train.npz`` / ``test.npz`` (or ``.npy``) or UCR's ``<Name>_TRAIN.ts`` /
  ``<Name>_TEST.ts``, or ``ucr:<Name>``: that set as the ``sktime`` wheel ships it (GunPoint,
  ItalyPowerDemand, ArrowHead, OSULeaf, BasicMotions, JapaneseVowels, ...; ``pip install sktime``).

Splits of a long series are chronological, as the forecasting literature cuts them (the Informer /
Autoformer / PatchTST data loaders): ETTh* 12 / 4 / 4 months of hourly rows (train the first 8,640,
val the next 2,880, test the next 2,880; the last 3,020 rows are in no split), ETTm* the same months
at 15 minutes, any other CSV 70% / 10% / 20%. A val or test window's context may reach back
``seq_len`` rows into the split before it (so its first target is the split's first row), never a
target: no value a model is scored on is ever in a training window's future window or context.

Normalization: each channel is standardized with the mean and standard deviation of the training
split only (sklearn's ``StandardScaler``: population std), for every split; the scores of a
forecasting set are in that standardized space, as published tables report them.

Pretraining reads a long series as ``SeriesWindows``: every window of ``data.seq_len`` consecutive
rows of the training split (stride 1), a batch ``series`` (B, C, seq_len). A set of series trains on
its whole series (the run's ``seq_len`` is the set's length). Evaluation reads labeled sets as
``SeriesSet`` (``series`` + ``labels``) for kNN / linear probes, and forecasting windows
(``series`` + ``target`` (B, C, horizon)) through ``forecast_windows``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from selfsup.errors import DataError

EMBEDDED_SERIES = "embedded-series"
EMBEDDED_SERIES_FILE = Path(__file__).resolve().parent / "embedded" / "ETTh1.csv.gz"
UCR_PREFIX = "ucr:"
SET_SUFFIXES = (".npy", ".npz", ".ts")
LONG_SUFFIXES = (".csv", ".csv.gz", ".parquet")  # one long series, one row per step
SPLITS = ("train", "val", "test")
VAL_ALIASES = ("val", "valid", "validation", "dev")
ETT_HOUR_MONTH = 30 * 24  # rows per month of the hourly ETT files (the loaders' 30-day months)


def is_series_source(source: str) -> bool:
    """Whether ``source`` names time-series data (cheap: names and suffixes only, no data read)."""
    text = source.strip()
    if text.lower() == EMBEDDED_SERIES or text.lower().startswith(UCR_PREFIX):
        return True
    path = Path(text).expanduser()
    name = path.name.lower()
    if name.endswith(LONG_SUFFIXES) or path.suffix.lower() in SET_SUFFIXES:
        return True
    if path.is_dir():
        return any(path.glob("*.ts")) or any((path / f"{s}{x}").is_file() for s in SPLITS for x in (".npy", ".npz"))
    return False


def is_long_series(source: str) -> bool:
    """A long series cut into windows (CSV), rather than a set of series."""
    text = source.strip()
    return text.lower() == EMBEDDED_SERIES or Path(text).name.lower().endswith(LONG_SUFFIXES)


# --------------------------------------------------------------------------------------
# one long multivariate series (CSV)


@dataclass(frozen=True)
class LongSeries:
    """A long series read from a CSV or Parquet file: ``values`` (T, C) float64 as stored, its column names."""

    values: np.ndarray
    columns: tuple[str, ...]
    name: str
    dropped: tuple[str, ...]  # non-numeric columns left out (the date)


def _csv_path(source: str) -> Path:
    if source.strip().lower() == EMBEDDED_SERIES:
        return EMBEDDED_SERIES_FILE
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"time-series data {source} not found (a CSV or Parquet file of one long series, a "
                        f".npy/.npz/.ts set, a folder of them, ucr:<Name> or {EMBEDDED_SERIES})")
    return path


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_long_csv(source: str) -> LongSeries:
    """The long series of a CSV (or Parquet) file, or of ``embedded-series``; cached per file version."""
    path = _csv_path(source)
    if path.name.lower().endswith(".parquet"):
        return _read_long_parquet(str(path), path.stat().st_mtime_ns)
    return _read_long_csv(str(path), path.stat().st_mtime_ns)


def _check_finite(path: Path, values: np.ndarray, columns: list[str]) -> None:
    if not np.isfinite(values).all():
        bad_cols = [c for k, c in enumerate(columns) if not np.isfinite(values[:, k]).all()]
        raise DataError(f"{path}: {int((~np.isfinite(values)).sum())} missing or non-finite values in "
                        f"{', '.join(bad_cols)}; fill them before training (e.g. carry the last value forward)")


@lru_cache(maxsize=4)
def _read_long_parquet(path_str: str, mtime_ns: int) -> LongSeries:
    path = Path(path_str)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'selfsup[parquet]'), or save the "
                        f"table as CSV") from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    if table.num_rows < 2:
        raise DataError(f"{path}: a long series needs rows, found {table.num_rows}")
    numeric = [f.name for f in table.schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
    if not numeric:
        raise DataError(f"{path}: no numeric column (found {', '.join(table.column_names)})")
    values = np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in numeric])
    _check_finite(path, values, numeric)
    return LongSeries(values, tuple(numeric), path.name, tuple(c for c in table.column_names if c not in numeric))


@lru_cache(maxsize=4)
def _read_long_csv(path_str: str, mtime_ns: int) -> LongSeries:
    path = Path(path_str)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 3:
        raise DataError(f"{path}: a long-series CSV needs a header line and rows, found {len(rows)} lines")
    header, body = rows[0], [r for r in rows[1:] if r]
    width = len(header)
    bad = [i + 2 for i, r in enumerate(body) if len(r) != width]
    if bad:
        raise DataError(f"{path}: {len(bad)} rows do not have the header's {width} fields (first: line {bad[0]})")
    # a column is a variable when its first rows are numbers (a date column is not)
    probe = body[: min(len(body), 50)]
    numeric = [j for j in range(width) if all(_is_number(r[j]) or r[j] == "" for r in probe)
               and any(r[j] != "" for r in probe)]
    if not numeric:
        raise DataError(f"{path}: no numeric column (found {', '.join(header)})")
    values = np.empty((len(body), len(numeric)), dtype=np.float64)
    for i, r in enumerate(body):
        for k, j in enumerate(numeric):
            cell = r[j]
            try:
                values[i, k] = float(cell) if cell != "" else math.nan
            except ValueError:
                raise DataError(f"{path}: line {i + 2}, column {header[j]!r}: {cell!r} is not a number") from None
    _check_finite(path, values, [header[j] for j in numeric])
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return LongSeries(values, tuple(header[j] for j in numeric), name,
                      tuple(h for j, h in enumerate(header) if j not in numeric))


def split_rows(name: str, rows: int, seq_len: int) -> dict[str, tuple[int, int]]:
    """Rows (start, end) each split's windows are cut from, chronologically (the module docstring):
    a val/test range starts ``seq_len`` rows before its first target."""
    stem = name.lower()
    if stem.startswith(("etth", "ettm")):
        month = ETT_HOUR_MONTH * (4 if stem.startswith("ettm") else 1)
        train, val, test = 12 * month, 4 * month, 4 * month
        if rows < train + val + test:
            raise DataError(f"{name}: {rows} rows, fewer than the ETT split's {train + val + test} (12/4/4 months)")
    else:
        train, test = int(rows * 0.7), int(rows * 0.2)
        val = rows - train - test
    bounds = {"train": (0, train), "val": (train - seq_len, train + val), "test": (train + val - seq_len, train + val + test)}
    return bounds


def describe_split(name: str) -> str:
    stem = name.lower()
    if stem.startswith(("etth", "ettm")):
        return "ETT's 12/4/4-month chronological split"
    return "a 70/10/20% chronological split"


class SeriesWindows:
    """Every window of ``length`` rows (and, for forecasting, the ``horizon`` rows after it) inside
    rows ``[start, end)`` of a standardized long series ``values`` (T, C): ``series`` (B, C, length)
    and ``target`` (B, C, horizon)."""

    has_labels = False
    classes: list[str] = []

    def __init__(self, values: torch.Tensor, start: int, end: int, length: int, horizon: int = 0, *,
                 name: str = "", fingerprint: str = "", starts: torch.Tensor | None = None) -> None:
        self.values, self.length, self.horizon = values, length, horizon
        count = end - start - length - horizon + 1
        if count < 1:
            raise DataError(f"{name}: rows {start}..{end} hold no window of data.seq_len={length}"
                            + (f" + horizon {horizon}" if horizon else "")
                            + ("; lower data.seq_len or the horizon" if horizon else "; lower data.seq_len"))
        self.starts = torch.arange(start, start + count) if starts is None else starts
        self.windows = values.unfold(0, length + horizon, 1)  # (rows - span + 1, C, span), a view
        self.name, self.fingerprint = name, fingerprint
        self.skipped, self.skip_reasons = 0, {}

    @property
    def channels(self) -> int:
        return int(self.values.shape[1])

    def __len__(self) -> int:
        return len(self.starts)

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        w = self.windows[self.starts[index]]
        out = {"series": w[..., : self.length].contiguous(), "index": index}
        if self.horizon:
            out["target"] = w[..., self.length:].contiguous()
        return out

    def subset(self, keep: torch.Tensor, name: str) -> SeriesWindows:
        first = int(self.starts[0])
        return SeriesWindows(self.values, first, first + len(self.starts) + self.length + self.horizon - 1,
                             self.length, self.horizon, name=name, fingerprint=f"{self.fingerprint}:{name}",
                             starts=self.starts[keep])


def standardize(train: np.ndarray, axis: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of the training data over ``axis`` (population std; 1 where constant)."""
    mean = train.mean(axis=axis, keepdims=True)
    std = train.std(axis=axis, keepdims=True)
    return mean, np.where(std > 0, std, 1.0)


def long_series_split(source: str, split: str, length: int, horizon: int = 0) -> SeriesWindows:
    """The windows of ``split`` of a long series, standardized with its training split's statistics."""
    series = read_long_csv(source)
    bounds = split_rows(series.name, len(series.values), length)
    key = "val" if split in VAL_ALIASES else split
    if key not in bounds:
        raise DataError(f"{series.name} has the splits train, val and test, not {split!r}")
    train_lo, train_hi = bounds["train"]
    mean, std = standardize(series.values[train_lo:train_hi], axis=(0,))
    values = torch.from_numpy(((series.values - mean) / std).astype(np.float32))
    lo, hi = bounds[key]
    digest = hashlib.sha256(series.values.tobytes()).hexdigest()[:16]
    return SeriesWindows(values, max(0, lo), hi, length, horizon,
                         name=f"{series.name} {key} ({describe_split(series.name)})",
                         fingerprint=f"{digest}:{key}:{length}:{horizon}")


# --------------------------------------------------------------------------------------
# sets of series (classification)


class SeriesSet:
    """Series of equal length held in memory, ``series`` (B, C, T), with ``labels`` when known."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, classes: list[str], *, name: str = "",
                 fingerprint: str = "", note: str = "") -> None:
        self.x, self.labels, self.classes = x, labels, classes
        self.name, self.fingerprint, self.note = name, fingerprint, note
        self.skipped, self.skip_reasons = 0, {}

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def length(self) -> int:
        return int(self.x.shape[2])

    def __len__(self) -> int:
        return len(self.x)

    @property
    def has_labels(self) -> bool:
        return bool(self.classes) and len(self) > 0 and bool((self.labels >= 0).all())

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"series": self.x[index], "labels": self.labels[index], "index": index}

    def subset(self, keep: torch.Tensor, name: str) -> SeriesSet:
        return SeriesSet(self.x[keep], self.labels[keep], self.classes, name=name,
                         fingerprint=f"{self.fingerprint}:{name}", note=self.note)


@dataclass
class RawSet:
    x: np.ndarray  # (N, C, T) float64
    labels: list[str] | None
    name: str
    padded: int = 0  # series shorter than the longest, padded with their last value


def read_ts(path: Path) -> RawSet:
    """A UCR/UEA ``.ts`` file (sktime's format): ``@`` header lines, then one series per line after
    ``@data``, its dimensions separated by ``:``, values by ``,``, the class label last (when
    ``@classLabel true``); ``?`` is a missing value. Series of unequal length are padded at the end
    with their last value (and counted)."""
    labeled, rows, labels, started = False, [], [], False
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not started:
                low = line.lower()
                if low.startswith("@classlabel"):
                    labeled = low.split()[1:2] == ["true"]
                elif low.startswith("@data"):
                    started = True
                continue
            fields = line.split(":")
            if labeled:
                labels.append(fields[-1].strip())
                fields = fields[:-1]
            try:
                dims = [np.array([float("nan") if v.strip() == "?" else float(v) for v in f.split(",")])
                        for f in fields]
            except ValueError:
                raise DataError(f"{path}: line {number} is not a series of numbers") from None
            rows.append(dims)
    if not rows:
        raise DataError(f"{path}: no series after @data")
    channels = {len(r) for r in rows}
    if len(channels) != 1:
        raise DataError(f"{path}: series have different numbers of dimensions ({sorted(channels)})")
    longest = max(len(d) for r in rows for d in r)
    x = np.empty((len(rows), channels.pop(), longest))
    padded = 0
    for i, r in enumerate(rows):
        for c, d in enumerate(r):
            x[i, c, : len(d)] = d
            if len(d) < longest:
                x[i, c, len(d):] = d[-1]
        padded += any(len(d) < longest for d in r)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: {int((~np.isfinite(x)).sum())} missing values ('?'); fill them first")
    return RawSet(x, labels if labeled else None, path.name, padded)


def _read_array(path: Path, split: str) -> RawSet:
    if path.suffix.lower() == ".npy":
        x, y = np.load(path, allow_pickle=False), None
    else:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            xk = f"x_{split}" if f"x_{split}" in keys else "x"
            if xk not in keys:
                raise DataError(f"{path} holds {', '.join(sorted(keys))}; a series set needs 'x' (and 'y' for "
                                "labels) or 'x_train' / 'x_test'")
            yk = f"y_{split}" if xk != "x" else "y"
            x, y = z[xk], (z[yk] if yk in keys else None)
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3:
        raise DataError(f"{path}: series arrays are (N, T) or (N, C, T), got shape {x.shape}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: {int((~np.isfinite(x)).sum())} missing or non-finite values; fill them first")
    labels = None if y is None else [str(v) for v in y.tolist()]
    if labels is not None and len(labels) != len(x):
        raise DataError(f"{path}: {len(labels)} labels for {len(x)} series")
    return RawSet(x, labels, path.name)


def ucr_folder(name: str) -> Path:
    """The folder of UCR/UEA set ``name`` inside the installed ``sktime`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("sktime")
    if spec is None or spec.origin is None:
        raise DataError(f"ucr:{name} reads the UCR/UEA sets the sktime wheel ships: pip install sktime "
                        "(or pass the folder of <Name>_TRAIN.ts / <Name>_TEST.ts files)")
    root = Path(spec.origin).parent / "datasets" / "data"
    folder = root / name
    if not folder.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*_TRAIN.ts")))
        raise DataError(f"sktime ships no UCR/UEA set {name!r}; it has {', '.join(known)}")
    return folder


def _set_file(source: str, split: str) -> Path | None:
    """The file holding ``split`` of a set of series, or None when one file serves every split."""
    text = source.strip()
    path = ucr_folder(text[len(UCR_PREFIX):]) if text.lower().startswith(UCR_PREFIX) else Path(text).expanduser()
    if not path.exists():
        raise DataError(f"time-series data {source} not found")
    if path.is_file():
        return path
    names = VAL_ALIASES if split in VAL_ALIASES else (split,)
    for name in names:
        for candidate in (*(path / f"{name}{s}" for s in SET_SUFFIXES), *path.glob(f"*_{name.upper()}.ts")):
            if candidate.is_file():
                return candidate
    raise DataError(f"{path} holds no {split!r} split (looked for {split}.npz/.npy/.ts and *_{split.upper()}.ts)")


def _read_set(path: Path, split: str) -> RawSet:
    return read_ts(path) if path.suffix.lower() == ".ts" else _read_array(path, split)


@lru_cache(maxsize=8)
def _cached_set(path_str: str, mtime_ns: int, split: str) -> RawSet:
    return _read_set(Path(path_str), split)


def raw_set(source: str, split: str) -> RawSet:
    path = _set_file(source, split)
    return _cached_set(str(path), path.stat().st_mtime_ns, split)


def series_set(source: str, split: str) -> SeriesSet:
    """A split of a set of series, standardized per channel with the training split's statistics;
    labels are the sorted distinct names (numbers in numeric order)."""
    raw, train = raw_set(source, split), raw_set(source, "train")
    if raw.x.shape[1:] != train.x.shape[1:]:
        raise DataError(f"{source}: the {split} series are {raw.x.shape[1:]} (channels, length) but the train "
                        f"series {train.x.shape[1:]}")
    mean, std = standardize(train.x, axis=(0, 2))
    x = torch.from_numpy(((raw.x - mean) / std).astype(np.float32))
    names = sorted(set(train.labels or []) | set(raw.labels or []),
                   key=lambda s: (0, float(s)) if _is_number(s) else (1, s))
    index = {n: i for i, n in enumerate(names)}
    labels = torch.tensor([index[v] for v in raw.labels] if raw.labels else [-1] * len(raw.x), dtype=torch.int64)
    digest = hashlib.sha256(raw.x.tobytes() + repr(raw.labels).encode()).hexdigest()[:16]
    note = f"; {raw.padded} shorter series padded with their last value" if raw.padded else ""
    what = re.sub(r"\.(ts|npz|npy)$", "", raw.name)
    return SeriesSet(x, labels, names if raw.labels else [], name=f"{what} ({split})", fingerprint=digest, note=note)


# --------------------------------------------------------------------------------------
# what a run reads


def series_length(source: str, seq_len: int) -> int:
    """Time steps of one training sample: ``seq_len`` for a long series, the set's length otherwise."""
    if is_long_series(source):
        return seq_len
    return int(raw_set(source, "train").x.shape[2])


def series_channels(source: str) -> int:
    """Channels (variables) of the data: a long series' numeric columns, a set's dimensions."""
    if is_long_series(source):
        return len(read_long_csv(source).columns)
    return int(raw_set(source, "train").x.shape[1])


def open_series(source: str, split: str, seq_len: int):
    """What a run trains (or is probed) on: windows of a long series, or a set's series."""
    if is_long_series(source):
        return long_series_split(source, split, seq_len)
    return series_set(source, split)


def forecast_windows(source: str, split: str, seq_len: int, horizon: int) -> SeriesWindows:
    """Context windows of ``seq_len`` rows with the next ``horizon`` rows as ``target``."""
    if not is_long_series(source):
        raise DataError(f"{source} is a set of separate series; forecasting needs one long series (a CSV, "
                        f"or {EMBEDDED_SERIES})")
    return long_series_split(source, split, seq_len, horizon)


def describe(data) -> str:
    if isinstance(data, SeriesWindows):
        return (f"{len(data):,} windows of {data.length} steps x {data.channels} channels from {data.name}, "
                "standardized with the training split's statistics")
    return (f"{len(data):,} series of {data.length} steps x {data.channels} channels ({data.name}, "
            f"{len(data.classes)} classes), standardized with the training split's statistics{data.note}")


__all__ = ["EMBEDDED_SERIES", "SeriesSet", "SeriesWindows", "describe", "forecast_windows", "is_series_source",
           "long_series_split", "open_series", "read_long_csv", "read_ts", "series_channels", "series_length", "series_set",
           "split_rows", "standardize"]

