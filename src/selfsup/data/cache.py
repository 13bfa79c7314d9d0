"""The decoded-data cache: decoded (and resized) datasets saved on disk so a second run starts in seconds.

An entry is a file ``<label>-<where>-<state>.pt``. `where` hashes which data it is (the folder
or torchvision dataset, the split, the decode size); `state` hashes every input file's path,
size, modification and change times and inode, the labels and the decoding settings, so any
change to the inputs gives a new name. Writing an entry deletes the other entries with the same
`where` (their state is gone for good), and `selfsup cache clean` deletes them all. Every entry
carries a checksum of its contents, verified on each read: a damaged file is rebuilt from the
images instead of being loaded with wrong pixels or labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "SELFSUP_CACHE_DIR"
DEFAULT_DECODED_CACHE = "~/.cache/selfsup/decoded"
CACHE_FORMAT_VERSION = 2
CHECKSUM_CHUNK = 32 << 20  # bytes hashed per thread; hashlib releases the GIL on large buffers
# The names this cache writes; nothing else in the folder is ever listed or deleted, since
# SELFSUP_CACHE_DIR may point at a folder that holds other files.
_ENTRY = re.compile(r"[A-Za-z0-9_.-]{1,40}-[0-9a-f]{8}-[0-9a-f]{16}\.pt")
_FORMAT1_ENTRY = re.compile(r"[A-Za-z0-9_.-]{1,40}-[0-9a-f]{24}\.pt")  # written before checksums existed
_TEMP_FILE = re.compile(r"[A-Za-z0-9_.-]{1,40}-(?:[0-9a-f]{8}-[0-9a-f]{16}|[0-9a-f]{24})\.pt\.[A-Za-z0-9_]+\.tmp")


def default_cache_dir() -> Path:
    """Where decoded datasets are cached: $SELFSUP_CACHE_DIR, else ~/.cache/selfsup/decoded."""
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_DECODED_CACHE).expanduser()


def where_key(**fields: Any) -> str:
    """Hash of what identifies the data regardless of its files' state (kind, path, split, size)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]


def state_key(files: Sequence[str | Path], *extra: Any) -> str:
    """Hash of each file's path, size, mtime, ctime and inode, plus `extra` (labels, settings).

    The change time (ctime) is set by the kernel on every write, rename or utime call and no
    user-space call can set it back, so a same-size replacement that keeps the old mtime
    (``cp -p``, ``rsync -t``) still changes it; files swapped between class folders keep
    their inodes, so the path-to-inode pairs change. Hashing every file's bytes would notice
    the same changes but rereads all of the data on every start, which for large photos
    decoded to a small size costs about as much as the cache saves.
    """
    digest = hashlib.sha256()
    for file in files:
        try:
            stat = os.stat(file)
            fields: tuple[int, ...] = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        except OSError:  # gone or a broken link: the decoder counts it as unreadable
            fields = (-1,)
        digest.update(f"{file}\0{fields}\n".encode("utf-8", "surrogateescape"))
    digest.update(json.dumps([CACHE_FORMAT_VERSION, *extra], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def cache_path(cache_dir: str | Path | None, label: str, where: str, state: str) -> Path:
    """A readable file name (sanitized label) plus the two keys."""
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:40] or "data"
    return directory / f"{slug}-{where}-{state}.pt"


def read_cache(path: Path) -> dict[str, Any] | None:
    """The verified payload of a cache entry, or None when it is absent, foreign, old or damaged."""
    if not path.is_file():
        return None
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"format {payload.get('version')!r}, expected {CACHE_FORMAT_VERSION}")
        if payload.get("checksum") != checksum(payload):
            raise ValueError("checksum mismatch: the file changed after it was written")
    except Exception as exc:  # corrupt, truncated or foreign file: rebuild rather than fail
        logger.warning("ignoring damaged decoded-data cache %s (%s); rebuilding it from the images", path, exc)
        return None
    return payload


def write_cache(path: Path, payload: dict[str, Any]) -> None:
    """Save atomically (temp file + os.replace), then delete the entries this one supersedes.

    A read-only or full disk only costs speed next time, so it is logged, not raised.
    """
    payload = {**payload, "version": CACHE_FORMAT_VERSION}
    payload["checksum"] = checksum(payload)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
        os.replace(tmp_name, path)
        tmp_name = None
        _remove_superseded(path)
    except OSError as exc:
        logger.warning("could not write decoded-data cache %s: %s", path, exc)
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.remove(tmp_name)


def _remove_superseded(path: Path) -> None:
    """Delete entries for the same data (same label and `where`) with another state: none can match again."""
    group = path.name.rsplit("-", 1)[0]
    for other in path.parent.glob(f"{group}-*.pt"):
        if other != path and _ENTRY.fullmatch(other.name) and other.name.rsplit("-", 1)[0] == group:
            other.unlink(missing_ok=True)
            logger.info("removed superseded decoded-data cache %s", other)


def checksum(payload: dict[str, Any]) -> str:
    """SHA-1 over the image and label bytes and the other fields (not a security measure: it finds damage).

    The pixels are hashed in chunks on several threads, since a cache can hold gigabytes.
    """
    meta = {key: value for key, value in payload.items() if key not in ("images", "labels", "checksum")}
    digest = hashlib.sha1(usedforsecurity=False)
    for name in ("images", "labels"):
        digest.update(_tensor_digest(payload[name]))
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    """Digest of a tensor's dtype, shape and bytes."""
    flat = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    chunks = [flat[start : start + CHECKSUM_CHUNK] for start in range(0, len(flat), CHECKSUM_CHUNK)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(lambda chunk: hashlib.sha1(chunk, usedforsecurity=False).digest(), chunks))
    return f"{tensor.dtype}{tuple(tensor.shape)}".encode() + b"".join(parts)


# --------------------------------------------------------------------------- selfsup cache info / clean


def cache_entries(directory: Path) -> list[Path]:
    """The files in `directory` that this cache wrote: entries of any format and left-over temp files."""
    if not directory.is_dir():
        return []
    patterns = (_ENTRY, _FORMAT1_ENTRY, _TEMP_FILE)
    return sorted(
        entry
        for entry in directory.iterdir()
        if entry.is_file() and any(pattern.fullmatch(entry.name) for pattern in patterns)
    )


def clean_cache(directory: Path) -> tuple[int, int]:
    """Delete every cache file in `directory` (other files are left alone); returns (files, bytes) freed."""
    count = freed = 0
    for entry in cache_entries(directory):
        size = entry.stat().st_size
        entry.unlink(missing_ok=True)
        count += 1
        freed += size
    return count, freed
