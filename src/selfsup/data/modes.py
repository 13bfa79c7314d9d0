"""``data.mode``: hold the decoded set in memory, or stream it from its folder.

``memory`` decodes everything once into one uint8 tensor: the fast path for sets that fit
(the embedded subset, CIFAR, STL-10, small folders). A folder's images are then resized on
their shorter side and centre-cropped to one square size, which cuts the borders of
non-square images. ``stream`` lists a folder and decodes each file in DataLoader workers at
its own size, so crops come from the whole image and the set may be far larger than memory.
``auto`` estimates what the memory path would hold and takes it when that fits the memory
budget (``data.memory_budget_gib``, else the smaller of 8 GiB and a quarter of the RAM),
streaming otherwise. ``shards`` reads WebDataset tar shards by index (data/shards.py; written
from a folder by ``selfsup data shard``); ``auto`` takes it for a folder that holds shards.

Every choice comes with one line saying what was chosen and why, and what the memory path
cut; the CLI prints it in the run's first line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from selfsup.data.datasets import (
    DATASET_NAMES,
    TORCHVISION_NATIVE_SIZE,
    _sample_sizes,
    load_dataset,
    max_image_pixels,
)
from selfsup.data.shards import open_shards, shard_split_dir
from selfsup.data.sources import (
    DEFAULT_MAX_SIDE,
    FolderStream,
    ImageStream,
    open_folder_stream,
)
from selfsup.errors import ConfigError

MODES = ("auto", "memory", "stream", "shards")
MEMORY_LIMIT_GIB = 8.0  # the memory path's own limit (load_dataset's max_memory_gib) when none is given
HEADER_SAMPLES = 16  # files whose header sizes estimate a folder's decoded size


@dataclass
class OpenedData:
    """A source and how it was chosen: ``mode`` is ``memory``, ``stream`` or ``shards``; ``note`` is one line
    for the run's first line (the mode, why, and what the memory path cut)."""

    dataset: Any
    mode: str
    note: str


def memory_budget(budget_gib: float | None = None) -> tuple[float, str]:
    """(GiB, where it comes from): the given budget, else min(8 GiB, a quarter of the RAM)."""
    if budget_gib is not None:
        return float(budget_gib), "data.memory_budget_gib"
    ram = _ram_gib()
    if ram is None or ram / 4 >= MEMORY_LIMIT_GIB:
        return MEMORY_LIMIT_GIB, "8 GiB, the memory path's limit"
    return ram / 4, f"a quarter of the {ram:.0f} GiB of RAM"


def _ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def is_folder_source(source: str) -> bool:
    """Whether ``source`` names a folder rather than a built-in dataset (``./name`` for a folder
    that shares a dataset's name, as load_dataset reads it)."""
    return source.strip().lower() not in DATASET_NAMES


def open_data(
    source: str,
    split: str,
    *,
    mode: str = "auto",
    root: str | None = None,
    decode_size: int | None = None,
    download: bool = True,
    max_side: int | None = DEFAULT_MAX_SIDE,
    eval_size: int | None = None,
    memory_budget_gib: float | None = None,
) -> OpenedData:
    """Open split ``split`` of ``source`` in memory or as a stream, as ``mode`` asks.

    ``eval_size``: a streamed split is prepared for evaluation at that side (see FolderStream);
    the memory path is unchanged by it. Raises ConfigError for a mode that cannot apply.
    """
    if mode not in MODES:
        raise ConfigError(f"data.mode={mode!r} is not a mode; use {', '.join(MODES)}")
    if not is_folder_source(source):
        if mode in ("stream", "shards"):
            raise ConfigError(f"data.mode={mode} reads folders; {source} is a built-in dataset held in "
                              "memory: use data.mode=auto or memory")
        reason = "data.mode=memory" if mode == "memory" else "auto: built-in datasets are held in memory"
        return _memory(source, split, root, decode_size, download, memory_budget_gib, reason)
    shards = shard_split_dir(source, split)
    if mode == "shards" or (shards is not None and mode == "auto"):
        stream = open_shards(source, split, max_side=max_side, eval_size=eval_size)
        reason = "data.mode=shards" if mode == "shards" else f"auto: {shards} holds shards"
        return OpenedData(stream, "shards", _stream_note(stream, reason, decode_size))
    if shards is not None:
        raise ConfigError(f"{shards} holds shards, which data.mode={mode} cannot read: use data.mode=shards or auto")
    if mode == "memory":
        return _memory(source, split, root, decode_size, download, memory_budget_gib, "data.mode=memory")
    if mode == "stream":
        stream = open_folder_stream(source, split, max_side=max_side, eval_size=eval_size)
        return OpenedData(stream, "stream", _stream_note(stream, "data.mode=stream", decode_size))
    return _auto(source, split, root, decode_size, download, max_side, eval_size, memory_budget_gib)


def _auto(source: str, split: str, root: str | None, decode_size: int | None, download: bool,
          max_side: int | None, eval_size: int | None, memory_budget_gib: float | None) -> OpenedData:
    """List the folder once, estimate the memory path's decoded size from it, and choose."""
    budget, why = memory_budget(memory_budget_gib)
    stream = open_folder_stream(source, split, max_side=max_side, eval_size=eval_size, warn=False)
    need = _memory_need_gib(stream, decode_size)
    if need is not None and need <= budget:  # load_dataset lists again and says what it left out
        reason = f"auto: about {_gib(need)} decoded fits the {_gib(budget)} budget ({why})"
        return _memory(source, split, root, decode_size, download, budget, reason)
    stream.warn_skipped()
    estimate = "an unknown size" if need is None else f"about {_gib(need)}"
    reason = f"auto: {estimate} decoded is over the {_gib(budget)} budget ({why})"
    return OpenedData(stream, "stream", _stream_note(stream, reason, decode_size))


def _memory_need_gib(stream: FolderStream, decode_size: int | None) -> float | None:
    """GiB the memory path would hold: every file at decode_size, else at the square of the shorter
    side of the median sampled header (what the memory path resizes mixed sizes to); None when no
    header could be read."""
    if decode_size is not None:
        side = decode_size
    else:
        step = max(1, len(stream) // HEADER_SAMPLES)
        files = [stream.path(i) for i in range(0, len(stream), step)][:HEADER_SAMPLES]
        limit = max_image_pixels()
        sizes = sorted((h * w, min(h, w)) for h, w in _sample_sizes(files, HEADER_SAMPLES) if h * w <= limit)
        if not sizes:
            return None
        side = sizes[len(sizes) // 2][1]
    return len(stream) * 3 * side * side / 2**30


def _memory(source: str, split: str, root: str | None, decode_size: int | None, download: bool,
            budget_gib: float | None, reason: str) -> OpenedData:
    limit = MEMORY_LIMIT_GIB if budget_gib is None else budget_gib
    dataset = load_dataset(source, split, root=root, decode_size=decode_size, download=download,
                           max_memory_gib=limit)
    height, width = dataset.image_size
    size = len(dataset) * 3 * height * width / 2**30
    note = f"memory ({reason}): {len(dataset)} images decoded at {height}x{width}, {_gib(size)}"
    if is_folder_source(source):
        note += ("; each image was resized on its shorter side and centre-cropped to this square, which cuts "
                 "the borders of non-square images (data.mode=stream keeps whole images)")
    elif decode_size is not None and decode_size != TORCHVISION_NATIVE_SIZE.get(source.strip().lower(), 32):
        note += " (resized from the square originals: nothing cut)"
    return OpenedData(dataset, "memory", note)


def _stream_note(stream: ImageStream, reason: str, decode_size: int | None) -> str:
    cap = f"long side capped at {stream.max_side} px" if stream.max_side else "no size cap"
    if isinstance(stream, FolderStream):
        what = f"stream ({reason}): {len(stream)} files"
    else:
        what = f"shards ({reason}): {len(stream)} samples in {len(stream.index.shards)} shards"
    note = f"{what}, each decoded whole by the loader workers, {cap}"
    if decode_size is not None:
        note += f"; data.decode_size={decode_size} applies to the memory path only"
    return note


def _gib(value: float) -> str:
    return f"{value:.2f} GiB" if value < 10 else f"{value:.0f} GiB"


__all__ = ["MODES", "OpenedData", "memory_budget", "open_data"]
