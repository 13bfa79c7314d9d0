"""Sharded image sets: WebDataset tar shards, read by index (``data.mode: shards``).

**Format.** Shards are standard WebDataset tars (``shard-000000.tar``, ...): a sample is the
members that share a key, ``<key>.<ext>`` holding the image's encoded bytes exactly as they were
stored in the source folder (never re-encoded) and ``<key>.cls`` its class number in ASCII. Any
WebDataset pipeline reads the shards ``selfsup data shard`` writes, and selfsup reads shards
written by other tools (img2dataset, webdataset's own ``ShardWriter``) the same way. They are
written with ``webdataset.TarWriter`` under hidden temporary names, renamed into place when all are
complete, then ``index.npz`` last; an interrupted run removes what it wrote and leaves no shard.

**Index.** ``index.npz`` beside the shards holds, for every sample, its shard, the byte offset
and size of its image member, its key and its label, plus the shard names and the class names.
Shards without one (written by another tool) are indexed when they are opened, from their tar
headers alone (no image data is read). The index arrays are numpy arrays, not Python objects,
so forked loader workers share their pages and memory stays flat as the set grows.

**Reading by index, in shard-local order.** A sample is read with one ``os.pread`` at its
offset. This makes a shard set a sized source like a streamed folder, so it gets the same
guarantees from the same loader (``StreamLoader``): the order of an epoch comes from (seed,
epoch) alone, every rank gets an equal share of it whatever the number of shards (no rank waits
in a collective for a batch that never comes), a run resumes at the exact batch it stopped at
whatever the number of workers, and an unreadable member is replaced by the next readable one and
counted. Sequential tar streaming (webdataset's own pipeline) gets none of these exactly. Reads
stay local: an epoch visits the shards in a random order, ``SHUFFLE_SHARDS`` at a time, and
shuffles the samples within each such group, so a batch touches at most that many files.
Compressed shards (``.tar.gz``) cannot be read at an offset and are refused with a message.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from selfsup.data.cache import state_key
from selfsup.data.datasets import (
    IMAGE_EXTENSIONS,
    SPLIT_FOLDER_ALIASES,
    TOO_MANY_PIXELS,
    UNREADABLE,
    _resolve_split_dir,
    _scan_folder,
    _Skips,
    max_image_pixels,
)
from selfsup.data.headers import image_size
from selfsup.data.sources import DEFAULT_MAX_SIDE, ImageStream
from selfsup.errors import DataError

logger = logging.getLogger(__name__)

INDEX_NAME = "index.npz"
INDEX_VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"
DEFAULT_SHARD_SAMPLES = 10_000
DEFAULT_SHARD_BYTES = 1 << 30
"""A shard closes at 10,000 samples or 1 GiB, whichever comes first (about 1 GiB of ImageNet JPEGs)."""

SHUFFLE_SHARDS = 4
"""Shards whose samples are shuffled together in an epoch: the most files one batch reads from."""

MAX_OPEN_SHARDS = 64
"""Shard files each process keeps open (least recently used ones are closed beyond this)."""

NO_IMAGE = "no image member"
"""Skip reason: a sample of a foreign shard with no member in a known image format."""
BAD_SHARD = "unreadable shard"
"""Skip reason: a shard whose tar headers could not be read (to its end, or at all)."""

_IMAGE_SUFFIXES = frozenset(ext.lstrip(".").lower() for ext in IMAGE_EXTENSIONS)


def is_shard_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a shard set: an index, or tar files at its top level."""
    path = Path(directory)
    return path.is_dir() and ((path / INDEX_NAME).is_file() or any(path.glob("*.tar")))


def shard_split_dir(source: str, split: str) -> Path | None:
    """The folder of split ``split`` of a shard set: ``source/split`` when that holds shards (one
    shard set per split, as ``selfsup data shard --split`` writes them), else ``source`` itself
    when it does; None when neither holds shards."""
    root = Path(source).expanduser().resolve()
    for directory in (*(root / name for name in SPLIT_FOLDER_ALIASES.get(split, (split,))), root):
        if is_shard_dir(directory):
            return directory
    return None


# ---------------------------------------------------------------------------------- the index


@dataclass
class ShardIndex:
    """Where every sample lives (see the module docstring). Arrays are ordered by (shard, offset)."""

    shards: list[str]
    shard: np.ndarray  # int32, the sample's shard (position in ``shards``)
    offset: np.ndarray  # int64, byte offset of the image member's data in its shard
    size: np.ndarray  # int64, the image member's size in bytes
    key: np.ndarray  # bytes (numpy "S"), the sample's key
    label: np.ndarray  # int64, -1 where the sample has no class
    classes: list[str]
    skips: _Skips = field(default_factory=_Skips)

    def __len__(self) -> int:
        return len(self.shard)

    def save(self, path: Path) -> None:
        """Write to ``path`` through a temporary file renamed into place."""
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, version=np.int64(INDEX_VERSION), shards=np.array(self.shards, dtype=str),
                     shard=self.shard, offset=self.offset, size=self.size, key=self.key, label=self.label,
                     classes=np.array(self.classes, dtype=str))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ShardIndex:
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["version"])
                if version != INDEX_VERSION:
                    raise DataError(f"{path} is a version-{version} shard index; this selfsup reads version "
                                    f"{INDEX_VERSION}: write the shards again with selfsup data shard")
                return cls([str(s) for s in data["shards"]], data["shard"].astype(np.int32),
                           data["offset"].astype(np.int64), data["size"].astype(np.int64), data["key"],
                           data["label"].astype(np.int64), [str(c) for c in data["classes"]])
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"cannot read the shard index {path} ({exc}); delete it to index the shards "
                            "from their tar headers, or write them again with selfsup data shard") from exc


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the rest the extension."""
    match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (name, "")


def index_tars(files: Sequence[Path], classes: Sequence[str] = (), *, names: Sequence[str] | None = None,
               progress: bool = True) -> ShardIndex:
    """Index tar shards from their headers: for each sample, its image member's offset and size,
    and its label (the ``cls`` member, read; it is a few bytes). Samples without an image member,
    and the rest of a shard whose headers stop being readable, are counted in ``skips``. ``names``:
    the shards' names in the index (default: the files' names)."""
    skips = _Skips()
    shard_ids: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    keys: list[bytes] = []
    labels: list[int] = []
    for shard_id, file in enumerate(tqdm(files, desc="indexing shards", unit="shard",
                                         disable=not progress or len(files) < 8)):
        samples: dict[str, list[int]] = {}  # key -> [offset, size, label]; members of one sample are adjacent
        try:
            with tarfile.open(file, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_member(member.name)
                    record = samples.setdefault(key, [-1, 0, -1])
                    if ext in _IMAGE_SUFFIXES and record[0] < 0:
                        record[0], record[1] = member.offset_data, member.size
                    elif ext == "cls":
                        text = tar.extractfile(member).read().strip()  # type: ignore[union-attr]
                        record[2] = int(text) if text.lstrip(b"-").isdigit() else -1
        except (tarfile.TarError, OSError) as exc:
            logger.warning("%s: stopped reading its tar headers (%s); the samples before that point are used",
                           file, exc)
            skips.add(BAD_SHARD, str(file))
        for key, (offset, size, label) in samples.items():
            if offset < 0:
                skips.add(NO_IMAGE, f"{file}:{key}")
                continue
            shard_ids.append(shard_id)
            offsets.append(offset)
            sizes.append(size)
            keys.append(key.encode("utf-8", "surrogateescape"))
            labels.append(label)
    label_array = np.array(labels, dtype=np.int64)
    if not classes and len(label_array) and label_array.max() >= 0:
        classes = [str(c) for c in range(int(label_array.max()) + 1)]
    return ShardIndex(list(names) if names is not None else [Path(f).name for f in files], np.array(shard_ids, dtype=np.int32),
                      np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64),
                      np.array(keys, dtype=bytes) if keys else np.zeros(0, dtype="S1"), label_array,
                      list(classes), skips)


# ---------------------------------------------------------------------------------- the source


class ShardStream(ImageStream):
    """A shard set read sample by sample (see the module docstring); decoding is FolderStream's."""

    def __init__(self, directory: str | Path, index: ShardIndex, *, name: str = "",
                 max_side: int | None = DEFAULT_MAX_SIDE, eval_size: int | None = None,
                 max_pixels: int | None = None) -> None:
        super().__init__(torch.from_numpy(index.label), index.classes, name=name, max_side=max_side,
                         eval_size=eval_size, max_pixels=max_pixels, skips=index.skips, directory=str(directory))
        self.index = index
        self._files = [str(Path(directory) / shard) for shard in index.shards]
        order = np.argsort(index.shard, kind="stable")
        bounds = np.searchsorted(index.shard[order], np.arange(len(index.shards) + 1))
        self._by_shard = [torch.from_numpy(order[bounds[s] : bounds[s + 1]].astype(np.int64))
                          for s in range(len(index.shards))]
        self._handles: OrderedDict[int, int] = OrderedDict()  # shard -> file descriptor, per process

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:  # workers started by spawn open their own files
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def path(self, index: int) -> str:
        shard = int(self.index.shard[index])
        return f"{self._files[shard]}:{self.index.key[index].decode('utf-8', 'surrogateescape')}"

    def read(self, index: int) -> torch.Tensor:
        """The image member's bytes, read at its offset (OSError when the shard is gone or short)."""
        shard, offset, size = int(self.index.shard[index]), int(self.index.offset[index]), int(self.index.size[index])
        data = os.pread(self._handle(shard), size, offset)
        if len(data) != size:
            raise OSError(f"{self._files[shard]} ends inside the member (read {len(data)} of {size} bytes)")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def _handle(self, shard: int) -> int:
        """This process's open descriptor of ``shard`` (pread needs no position, so forks may share it)."""
        handle = self._handles.get(shard)
        if handle is None:
            handle = os.open(self._files[shard], os.O_RDONLY)
            self._handles[shard] = handle
            if len(self._handles) > MAX_OPEN_SHARDS:
                os.close(self._handles.popitem(last=False)[1])
        else:
            self._handles.move_to_end(shard)
        return handle

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """Shards in a random order, SHUFFLE_SHARDS at a time, samples shuffled within each group."""
        shards = torch.randperm(len(self._by_shard), generator=generator).tolist()
        parts = []
        for start in range(0, len(shards), SHUFFLE_SHARDS):
            group = torch.cat([self._by_shard[s] for s in shards[start : start + SHUFFLE_SHARDS]])
            parts.append(group[torch.randperm(len(group), generator=generator)])
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def subset(self, keep: torch.Tensor, name: str) -> ShardStream:
        """The samples at the positions ``keep``, in that order (``data.limit``)."""
        rows = keep.numpy()
        index = ShardIndex(self.index.shards, self.index.shard[rows], self.index.offset[rows], self.index.size[rows],
                           self.index.key[rows], self.index.label[rows], self.index.classes, self._copied_skips())
        return ShardStream(self.directory, index, name=name, max_side=self.max_side, eval_size=self.eval_size,
                           max_pixels=self.max_pixels)

    @property
    def fingerprint(self) -> str:
        """Every shard's path and stat, the samples' places and labels, and the decoding."""
        if self._fingerprint is None:
            import hashlib

            digest = hashlib.sha256()
            for array in (self.index.shard, self.index.offset, self.index.label):
                digest.update(np.ascontiguousarray(array).tobytes())
            self._fingerprint = state_key(self._files, digest.hexdigest(), self.classes, self.max_side,
                                          self.eval_size, self.max_pixels)
        return self._fingerprint


def open_shards(source: str, split: str = "train", *, max_side: int | None = DEFAULT_MAX_SIDE,
                eval_size: int | None = None, warn: bool = True) -> ShardStream:
    """Open split ``split`` of the shard set at ``source`` (see ``shard_split_dir``), from its index,
    or from its tar headers when it has none."""
    directory = shard_split_dir(source, split)
    root = Path(source).expanduser().resolve()
    if directory is None:
        compressed = sorted(root.glob("*.tar.gz")) + sorted(root.glob("*.tgz"))
        if compressed:
            raise DataError(f"{root} holds compressed shards ({compressed[0].name}); a shard is read at byte "
                            "offsets, which compression prevents: decompress them (gunzip) or write them again "
                            "with selfsup data shard")
        raise DataError(f"no shards in {root} or {root / split}: expected {INDEX_NAME} or *.tar files; write them "
                        f"from an image folder with: selfsup data shard FOLDER {root}")
    if (directory / INDEX_NAME).is_file():
        index = ShardIndex.load(directory / INDEX_NAME)
        _check_index(directory, index)
    else:
        index = index_tars(sorted(directory.glob("*.tar")))
    if len(index) == 0:
        raise DataError(f"the shards in {directory} hold no image: expected members such as <key>.jpg "
                        f"({', '.join(sorted(_IMAGE_SUFFIXES))}) with an optional <key>.cls label")
    stream = ShardStream(directory, index, name=f"{root.name}:{split}", max_side=max_side, eval_size=eval_size)
    if warn and index.skips.total:
        reasons = ", ".join(f"{count} {reason}" for reason, count in index.skips.counts.items())
        logger.warning("%s: left out %s (e.g. %s)", directory, reasons, index.skips.first_examples()[0])
    return stream


def _check_index(directory: Path, index: ShardIndex) -> None:
    """Refuse an index whose shards are missing or shorter than the members it places in them."""
    ends = np.zeros(len(index.shards), dtype=np.int64)
    np.maximum.at(ends, index.shard, index.offset + index.size)
    for name, end in zip(index.shards, ends):
        try:
            size = (directory / name).stat().st_size
        except OSError:
            size = -1
        if size < end:
            found = "is missing" if size < 0 else f"has {size} bytes, the index places data up to byte {end}"
            raise DataError(f"{directory / name} {found}: the index no longer matches the shards; write them "
                            "again with selfsup data shard, or delete index.npz to index the tars as they are")


# ---------------------------------------------------------------------------------- writing


@dataclass
class ShardSummary:
    """What ``write_shards`` wrote and what it left out."""

    out: Path
    samples: int
    shards: int
    bytes: int
    seconds: float
    skips: _Skips


def write_shards(source: str, out: str | Path, split: str = "train", *, max_samples: int = DEFAULT_SHARD_SAMPLES,
                 max_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> ShardSummary:
    """Write split ``split`` of the image folder ``source`` as WebDataset shards plus ``index.npz``
    in ``out`` (see the module docstring). Files are listed as the folder sources list them (the
    same walker, classes and skips); a file that cannot be read, or whose header declares more
    pixels than the limit, is left out and counted. The images are copied byte for byte."""
    from webdataset import TarWriter

    if max_samples <= 0 or max_bytes <= 0:
        raise DataError(f"a shard needs room for at least one sample (max_samples={max_samples}, max_bytes={max_bytes})")
    started = time.perf_counter()
    root = Path(source).expanduser().resolve()
    directory = _resolve_split_dir(root, split)
    skips = _Skips()
    files, labels, classes = _scan_folder(directory, skips)
    out = Path(out).expanduser().resolve()
    if out == directory or directory in out.parents:
        raise DataError(f"write the shards outside the folder they are made from ({directory})")
    out.mkdir(parents=True, exist_ok=True)
    if is_shard_dir(out):
        raise DataError(f"{out} already holds shards; write to an empty folder (or delete them first)")
    limit = max_image_pixels()
    written: list[Path] = []  # complete shards, still under their hidden temporary names
    state: dict[str, Any] = {"writer": None, "count": 0, "bytes": 0}

    def close() -> None:
        if state["writer"] is not None:
            state["writer"].close()
            state.update(writer=None, count=0, bytes=0)

    total_bytes = 0
    try:
        for number, (file, label) in enumerate(tqdm(list(zip(files, labels)), desc=f"sharding {directory.name}",
                                                    unit="img", disable=not progress or len(files) < 1000)):
            try:
                data = Path(file).read_bytes()
            except OSError:
                skips.add(UNREADABLE, file)
                continue
            size = image_size(memoryview(data))
            if size is not None and size[0] * size[1] > limit:
                skips.add(TOO_MANY_PIXELS, file)
                continue
            if state["writer"] is not None and (state["count"] >= max_samples
                                                 or state["bytes"] + len(data) > max_bytes):
                close()
            if state["writer"] is None:
                written.append(out / f".{SHARD_PATTERN.format(len(written))}.tmp")
                state["writer"] = TarWriter(str(written[-1]), encoder=True, mtime=0.0)  # a path: it closes the file
            ext = Path(file).suffix.lower().lstrip(".") or "jpg"
            sample: dict[str, Any] = {"__key__": f"{number:09d}", ext: data}
            if label >= 0:
                sample["cls"] = str(label)
            state["writer"].write(sample)
            state["count"] += 1
            state["bytes"] += len(data)
            total_bytes += len(data)
        close()
        if not written:
            raise DataError(f"none of the {len(files)} files in {directory} could be read; no shard was written")
        names = [SHARD_PATTERN.format(number) for number in range(len(written))]
        index = index_tars(written, classes, names=names, progress=progress)
        for tmp, name in zip(written, names):  # every shard whole before any gets its name, the index last
            os.replace(tmp, out / name)
        index.save(out / INDEX_NAME)
    finally:
        close()
        for tmp in written:  # interrupted: nothing half-written keeps a name that looks like a shard
            tmp.unlink(missing_ok=True)
    return ShardSummary(out, len(index), len(written), total_bytes, time.perf_counter() - started, skips)


__all__ = ["INDEX_NAME", "ShardIndex", "ShardStream", "ShardSummary", "index_tars", "is_shard_dir",
           "open_shards", "shard_split_dir", "write_shards"]
