"""In-memory image datasets: the embedded CIFAR-10 subset, torchvision datasets and image folders.

Everything is decoded once into a single uint8 tensor of shape N x 3 x H x W.
Self-supervised methods read every image many times per run (several augmented
views per epoch), so paying the JPEG decode once and then indexing a tensor is
far cheaper than decoding files inside a DataLoader on every access. Decoded
folders and resized torchvision datasets are cached on disk so a second run
starts in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from selfsup.errors import DataError

logger = logging.getLogger(__name__)

# torchvision 0.29 deprecates torchvision.io decoding in favour of TorchCodec; it is still the
# fastest dependency-free decoder here, so silence only that notice, only from that module.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
    module=r"torchvision\.io\.image",
)

EMBEDDED_PATH = Path(__file__).resolve().parent / "embedded" / "cifar10_subset.npz"
EMBEDDED_SPLITS = ("train", "test")
TORCHVISION_SPLITS: dict[str, tuple[str, ...]] = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
}
TORCHVISION_NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96}
DATASET_NAMES = ("embedded", *TORCHVISION_SPLITS)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLIT_FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "test": ("test", "val", "validation"),
}
DEFAULT_DATASETS_ROOT = "~/.cache/selfsup/datasets"
DEFAULT_DECODED_CACHE = "~/.cache/selfsup/decoded"
CACHE_ENV_VAR = "SELFSUP_CACHE_DIR"
CACHE_FORMAT_VERSION = 1
PROGRESS_BAR_MIN_FILES = 2000
MAX_SKIPPED_EXAMPLES = 5
RESIZE_CHUNK = 1024
MAP_CHUNK = 64

_T = TypeVar("_T")
_R = TypeVar("_R")


class ImageArrayDataset(Dataset):
    """A whole dataset held as one contiguous uint8 tensor plus int64 labels.

    `labels` is -1 for unlabeled samples and `classes` is empty when nothing
    is labeled. `skipped` / `skipped_examples` record files that could not be
    decoded, so callers can report them instead of silently losing data.
    Tensors may be shared between datasets loaded from the same source (the
    embedded subset is memoized): never modify `images` in place.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str] = (),
        *,
        name: str = "",
        skipped: int = 0,
        skipped_examples: Sequence[str] = (),
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a uint8 N x 3 x H x W tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)
        self.name = name
        self.skipped = int(skipped)
        self.skipped_examples = list(skipped_examples)
        if self.classes and self.labels.numel() and int(self.labels.max()) >= len(self.classes):
            raise ValueError(f"label {int(self.labels.max())} is out of range for {len(self.classes)} classes")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def has_labels(self) -> bool:
        """True when there are classes and every sample carries a label (what linear evaluation needs)."""
        return bool(self.classes) and len(self) > 0 and bool((self.labels >= 0).all())

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) shared by all images."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def __repr__(self) -> str:
        height, width = self.image_size
        return (
            f"ImageArrayDataset(name={self.name!r}, n={len(self)}, size={height}x{width}, "
            f"classes={len(self.classes)}, skipped={self.skipped})"
        )


def load_dataset(
    source: str = "embedded",
    split: str = "train",
    *,
    root: str | None = None,
    decode_size: int | None = None,
    download: bool = True,
    cache_dir: str | None = None,
    max_memory_gib: float = 8.0,
) -> ImageArrayDataset:
    """Load `source` into memory as an ImageArrayDataset.

    `source` is "embedded" (the CIFAR-10 subset shipped with the package),
    "cifar10", "cifar100", "stl10" (torchvision, stored under `root`), or a
    folder path (ImageFolder layout, or a flat folder of unlabeled images).
    Use "./name" for a folder that happens to share a dataset name.
    `decode_size` resizes the shorter side then center-crops to a square.
    `max_memory_gib` refuses datasets whose decoded tensor would not fit.
    """
    if decode_size is not None and decode_size <= 0:
        raise DataError(f"decode_size must be a positive number of pixels, got {decode_size}")
    key = source.strip().lower()
    if key == "embedded":
        return _load_embedded(split, decode_size, max_memory_gib)
    if key in TORCHVISION_SPLITS:
        return _load_torchvision(key, split, root, decode_size, download, cache_dir, max_memory_gib)
    return _load_folder(source, split, decode_size, cache_dir, max_memory_gib)


# --------------------------------------------------------------------------- embedded


def _load_embedded(split: str, decode_size: int | None, max_memory_gib: float) -> ImageArrayDataset:
    """Return the embedded subset, resized on request (resizing is not memoized)."""
    if split not in EMBEDDED_SPLITS:
        raise DataError(f"the embedded dataset has splits {', '.join(EMBEDDED_SPLITS)}; got split={split!r}")
    images, labels, classes = _decode_embedded(split)
    if decode_size is not None:
        _check_memory(len(labels), decode_size, decode_size, max_memory_gib, "the embedded dataset")
        images = _resize_uniform(images, decode_size)
    return ImageArrayDataset(images, labels, classes, name=f"embedded:{split}")


@functools.lru_cache(maxsize=None)
def _decode_embedded(split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Decode one split of the embedded npz with a single batched decode_jpeg call.

    Memoized per process: tests and notebooks load it many times.
    """
    if not EMBEDDED_PATH.is_file():
        raise DataError(
            f"the embedded dataset file {EMBEDDED_PATH} is missing; reinstall selfsup "
            "or rebuild it with scripts/build_embedded.py"
        )
    with np.load(EMBEDDED_PATH) as archive:
        data = archive[f"{split}_bytes"]
        offsets = archive[f"{split}_offsets"]
        labels = torch.from_numpy(archive[f"{split}_labels"].astype(np.int64))
        classes = tuple(str(name) for name in archive["classes"])
    blob = torch.from_numpy(data)
    chunks = [blob[start:end] for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    images = torch.stack(decode_jpeg(chunks, mode=ImageReadMode.RGB))
    return images, labels, classes


# --------------------------------------------------------------------------- torchvision


def _torchvision_class(name: str) -> type:
    """Import lazily: torchvision.datasets is only needed for these sources."""
    from torchvision import datasets

    return {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "stl10": datasets.STL10}[name]


def _load_torchvision(
    name: str,
    split: str,
    root: str | None,
    decode_size: int | None,
    download: bool,
    cache_dir: str | None,
    max_memory_gib: float,
) -> ImageArrayDataset:
    """Load a torchvision dataset; resized versions are cached since resizing is the slow part."""
    splits = TORCHVISION_SPLITS[name]
    if split not in splits:
        raise DataError(f"{name} has splits {', '.join(splits)}; got split={split!r}")
    root_dir = Path(root or DEFAULT_DATASETS_ROOT).expanduser().resolve()
    dataset_name = f"{name}:{split}"
    target = decode_size if decode_size != TORCHVISION_NATIVE_SIZE[name] else None
    cache_path = None
    if target is not None:
        data_dir = root_dir / _torchvision_class(name).base_folder
        data_files = sorted(p for p in data_dir.rglob("*") if p.is_file()) if data_dir.is_dir() else []
        if data_files:
            cache_path = _cache_path(cache_dir, name, _fingerprint(data_files, name, str(data_dir), split, target))
            cached = _read_cache(cache_path, dataset_name)
            if cached is not None:
                return cached
    images, labels, classes = _read_torchvision(name, root_dir, split, download)
    if target is not None:
        _check_memory(len(labels), target, target, max_memory_gib, dataset_name)
        images = _resize_uniform(images, target)
    dataset = ImageArrayDataset(images, labels, classes, name=dataset_name)
    if cache_path is not None:
        _write_cache(cache_path, dataset)
    return dataset


def _read_torchvision(
    name: str, root_dir: Path, split: str, download: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Construct the torchvision dataset and convert it to N x 3 x H x W uint8 plus labels.

    An archive already placed in `root_dir` is verified and extracted even with
    download=False, so offline users only need to copy the file there.
    """
    cls = _torchvision_class(name)
    fetch = _should_fetch(name, root_dir, download)
    try:
        if name == "stl10":
            raw = cls(str(root_dir), split=split, download=fetch)
        else:
            raw = cls(str(root_dir), train=split == "train", download=fetch)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, tarfile errors...
        raise DataError(_torchvision_missing_message(name, root_dir, download, exc)) from exc
    if name == "stl10":
        images = torch.from_numpy(np.ascontiguousarray(raw.data))
        labels = torch.from_numpy(np.asarray(raw.labels, dtype=np.int64))
    else:
        images = torch.from_numpy(raw.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(raw.targets, dtype=torch.int64)
    classes = list(raw.classes) if bool((labels >= 0).any()) else []
    return images, labels, classes


def _should_fetch(name: str, root_dir: Path, download: bool) -> bool:
    """Whether to let torchvision download/extract: always with download=True, or to extract a placed archive.

    With download=False a placed archive is checked here first, because
    torchvision would otherwise try to re-download a file that fails its MD5.
    """
    if download:
        return True
    from torchvision.datasets.utils import check_integrity

    cls = _torchvision_class(name)
    archive = root_dir / cls.filename
    if (root_dir / cls.base_folder).is_dir() or not archive.is_file():
        return False
    if not check_integrity(str(archive), cls.tgz_md5):
        raise DataError(_bad_archive_message(archive, cls.url))
    return True


def _bad_archive_message(archive: Path, url: str) -> str:
    """Message for an archive that is present but not the expected file."""
    return (
        f"{archive} exists but fails its MD5 check (incomplete or wrong file); "
        f"replace it with a complete copy of {url}"
    )


def _torchvision_missing_message(name: str, root_dir: Path, download: bool, exc: Exception) -> str:
    """Say exactly which archive to put in which folder, since offline machines cannot download."""
    from torchvision.datasets.utils import check_integrity

    cls = _torchvision_class(name)
    archive = root_dir / cls.filename
    if archive.is_file() and not check_integrity(str(archive), cls.tgz_md5):
        return _bad_archive_message(archive, cls.url)
    reason = f"the download failed: {exc}" if download else "download=False and it is not there"
    return (
        f"{name} is not available in {root_dir} ({reason}). "
        f"Put {cls.filename} (from {cls.url}) in {root_dir}/ and run again; "
        "it is verified and extracted without network access (or pass root= to use another folder)."
    )


# --------------------------------------------------------------------------- folders


def _load_folder(
    source: str, split: str, decode_size: int | None, cache_dir: str | None, max_memory_gib: float
) -> ImageArrayDataset:
    """Load an ImageFolder-style or flat folder, using the decoded cache when it is fresh."""
    root = Path(source).expanduser().resolve()
    directory = _resolve_split_dir(root, split)
    files, labels, classes = _scan_folder(directory)
    dataset_name = f"{root.name}:{split}"
    # Keyed on the resolved folder, not the split name: splits that share a folder share the cache.
    key = _fingerprint(files, "folder", str(directory), "", decode_size)
    label = root.name if directory == root else f"{root.name}-{directory.name}"
    cache_path = _cache_path(cache_dir, label, key)
    cached = _read_cache(cache_path, dataset_name)
    if cached is not None:
        return cached
    _check_folder_memory(files, decode_size, max_memory_gib, directory)
    dataset = _decode_folder(files, labels, classes, decode_size, directory, dataset_name, max_memory_gib)
    _write_cache(cache_path, dataset)
    return dataset


def _resolve_split_dir(root: Path, split: str) -> Path:
    """Pick `<root>/<split>` (or an alias such as val/ for test), else `<root>` itself.

    A folder that has split subfolders but not the requested one is an error:
    treating train/ as a class of the test set would be silently wrong.
    """
    if not root.exists():
        raise DataError(
            f"data folder {root} does not exist; pass an existing folder of images "
            f"or one of the dataset names: {', '.join(DATASET_NAMES)}"
        )
    if not root.is_dir():
        raise DataError(f"data source {root} is a file; pass a folder of images (class subfolders or flat)")
    candidates = SPLIT_FOLDER_ALIASES.get(split, (split,))
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    known = {alias for aliases in SPLIT_FOLDER_ALIASES.values() for alias in aliases}
    present = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and entry.name in known)
    if present:
        raise DataError(
            f"{root} has split folders {', '.join(present)} but none for split {split!r} "
            f"(looked for {', '.join(name + '/' for name in candidates)})"
        )
    return root


def _is_image(name: str) -> bool:
    """Whether a file name has one of the supported image extensions (case-insensitive)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_below(directory: Path) -> list[str]:
    """All image files under `directory`, recursively, sorted, skipping hidden folders.

    Plain strings, not Path objects: building and sorting 50,000+ Paths costs seconds.
    """
    found: list[str] = []
    for current, subdirs, names in os.walk(directory, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend(os.path.join(current, name) for name in names if _is_image(name))
    return sorted(found)


def _scan_folder(directory: Path) -> tuple[list[str], list[int], list[str]]:
    """List image files with labels: class subfolders give ImageFolder labels, a flat folder gives -1."""
    entries = sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))
    if not entries:
        raise DataError(
            f"data folder {directory} is empty; expected images in class subfolders "
            f"({directory}/<class>/<image>.jpg) or directly in it"
        )
    per_class = {entry.name: _images_below(entry) for entry in entries if entry.is_dir()}
    per_class = {name: images for name, images in per_class.items() if images}
    top_level = [str(entry) for entry in entries if entry.is_file() and _is_image(entry.name)]
    if per_class:
        if top_level:
            logger.warning(
                "%s has class subfolders; ignoring %d image(s) directly inside it", directory, len(top_level)
            )
        classes = sorted(per_class)
        files = [path for name in classes for path in per_class[name]]
        labels = [index for index, name in enumerate(classes) for _ in per_class[name]]
        return files, labels, classes
    if top_level:
        return top_level, [-1] * len(top_level), []
    raise DataError(
        f"no images found in {directory}; expected files with extensions "
        f"{', '.join(IMAGE_EXTENSIONS)} in class subfolders or directly in the folder"
    )


def _decode_file(path: str) -> torch.Tensor:
    """Decode one image to uint8 3 x H x W RGB: torchvision first (fast), PIL for what it cannot read."""
    try:
        image = decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError:
        image = _decode_with_pil(path)
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_with_pil(path: str) -> torch.Tensor:
    """PIL fallback (e.g. BMP variants); truncated files still fail, so they get skipped."""
    from PIL import Image

    with Image.open(path) as handle:
        array = np.asarray(handle.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _decode_or_none(path: str, decode_size: int | None) -> torch.Tensor | None:
    """Decode and optionally resize one file; None marks an unreadable file to skip."""
    try:
        image = _decode_file(path)
    except Exception as exc:  # any decoder failure means "corrupt file": count it, keep going
        logger.debug("cannot decode %s: %s", path, exc)
        return None
    return image if decode_size is None else _resize_and_crop(image, decode_size)


def _parallel_map(fn: Callable[[_T], _R], items: Sequence[_T], desc: str) -> list[_R]:
    """Map in a thread pool (decoding and resizing release the GIL), with a bar for big folders.

    Work is submitted in chunks: one future per image makes the main thread
    spend longer scheduling than the workers spend decoding small images.
    """
    workers = min(32, (os.cpu_count() or 1) + 4)
    chunks = [items[start : start + MAP_CHUNK] for start in range(0, len(items), MAP_CHUNK)]
    results: list[_R] = []
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(items), desc=desc, unit="img", disable=len(items) <= PROGRESS_BAR_MIN_FILES) as bar,
    ):
        for part in pool.map(lambda chunk: [fn(item) for item in chunk], chunks):
            results.extend(part)
            bar.update(len(part))
    return results


def _decode_folder(
    files: list[str],
    labels: list[int],
    classes: list[str],
    decode_size: int | None,
    directory: Path,
    dataset_name: str,
    max_memory_gib: float,
) -> ImageArrayDataset:
    """Decode every file, skip the unreadable ones, bring all images to one size and stack them."""
    decoded = _parallel_map(lambda path: _decode_or_none(path, decode_size), files, f"decoding {directory.name}")
    kept = [i for i, image in enumerate(decoded) if image is not None]
    skipped = [files[i] for i, image in enumerate(decoded) if image is None]
    if not kept:
        raise DataError(
            f"none of the {len(files)} image files in {directory} could be decoded "
            f"(e.g. {skipped[0]}); check that they are valid images"
        )
    if skipped:
        logger.warning(
            "skipped %d unreadable image(s) in %s: %s%s",
            len(skipped),
            directory,
            ", ".join(skipped[:MAX_SKIPPED_EXAMPLES]),
            ", ..." if len(skipped) > MAX_SKIPPED_EXAMPLES else "",
        )
    images = [image for image in decoded if image is not None]
    del decoded  # the per-image tensors must be freed while they are stacked
    images = _unify_sizes(images, directory)
    height, width = images[0].shape[-2:]
    _check_memory(len(images), height, width, max_memory_gib, str(directory))
    return ImageArrayDataset(
        _stack_releasing(images),
        torch.tensor([labels[i] for i in kept], dtype=torch.int64),
        classes,
        name=dataset_name,
        skipped=len(skipped),
        skipped_examples=skipped[:MAX_SKIPPED_EXAMPLES],
    )


def _unify_sizes(images: list[torch.Tensor], directory: Path) -> list[torch.Tensor]:
    """Keep a shared size; otherwise resize to the most common size's shorter side, square-cropped."""
    sizes = Counter(tuple(image.shape[-2:]) for image in images)
    if len(sizes) == 1:
        return images
    (height, width), count = sizes.most_common(1)[0]
    size = min(height, width)
    logger.info(
        "images in %s have %d different sizes; resizing all to %dx%d (shorter side of the most common "
        "size %dx%d, %d images); pass decode_size to choose",
        directory,
        len(sizes),
        size,
        size,
        height,
        width,
        count,
    )
    return _parallel_map(lambda image: _resize_and_crop(image, size), images, "resizing")


def _stack_releasing(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack into one tensor chunk by chunk, emptying `images` as it goes so peak memory stays near 1x.

    Chunks are taken from the end so each one can be deleted from the list cheaply.
    """
    count = len(images)
    height, width = images[0].shape[-2:]
    out = torch.empty((count, 3, height, width), dtype=torch.uint8)
    for start in reversed(range(0, count, RESIZE_CHUNK)):
        torch.stack(images[start:], out=out[start : start + len(images) - start])
        del images[start:]
    return out


def _resize_and_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of the shorter side to `size`, then a centered size x size crop."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    resized = TF.resize(image, [size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(resized, [size, size]).contiguous()


def _resize_uniform(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize an N x 3 x H x W batch in chunks so the float intermediates stay small."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], RESIZE_CHUNK):
        out[start : start + RESIZE_CHUNK] = _resize_and_crop(images[start : start + RESIZE_CHUNK], size)
    return out


# --------------------------------------------------------------------------- memory


def _check_memory(count: int, height: int, width: int, max_memory_gib: float, what: str) -> None:
    """Refuse datasets whose decoded tensor would exceed the limit, before allocating it."""
    needed = count * 3 * height * width / 2**30
    if needed > max_memory_gib:
        raise DataError(
            f"{what}: {count} images at {height}x{width} need {needed:.1f} GiB decoded, over the "
            f"{max_memory_gib:g} GiB limit (max_memory_gib); pass a smaller decode_size "
            "(e.g. 64 or 96). Streaming datasets too large for memory (ImageNet-size) "
            "is not supported yet."
        )


def _check_folder_memory(files: list[str], decode_size: int | None, max_memory_gib: float, directory: Path) -> None:
    """Estimate the decoded size before decoding: exact with decode_size, else from sampled headers."""
    if decode_size is not None:
        _check_memory(len(files), decode_size, decode_size, max_memory_gib, str(directory))
        return
    sizes = sorted(_sample_sizes(files, samples=16), key=lambda size: size[0] * size[1])
    if sizes:
        height, width = sizes[len(sizes) // 2]
        _check_memory(len(files), height, width, max_memory_gib, str(directory))


def _sample_sizes(files: Sequence[str], samples: int) -> list[tuple[int, int]]:
    """Read (H, W) from the headers of evenly spaced files; PIL does not decode pixels for this."""
    from PIL import Image

    step = max(1, len(files) // samples)
    sizes = []
    for path in files[::step][:samples]:
        try:
            with Image.open(path) as handle:
                width, height = handle.size
        except Exception:  # unreadable files are reported later by the real decode
            continue
        sizes.append((height, width))
    return sizes


# --------------------------------------------------------------------------- decoded cache


def _fingerprint(files: Sequence[str | Path], kind: str, path: str, split: str, decode_size: int | None) -> str:
    """Hash what identifies the decoded result: location, split, size, and the files' count/bytes/mtime/names.

    The names are included so moving files between class folders invalidates the cache.
    """
    total_bytes = 0
    newest_mtime = 0
    names = hashlib.sha256()
    for file in files:
        stat = os.stat(file)
        total_bytes += stat.st_size
        newest_mtime = max(newest_mtime, stat.st_mtime_ns)
        names.update(str(file).encode("utf-8", "surrogateescape") + b"\0")
    fields = {
        "version": CACHE_FORMAT_VERSION,
        "kind": kind,
        "path": path,
        "split": split,
        "decode_size": decode_size,
        "count": len(files),
        "bytes": total_bytes,
        "mtime_ns": newest_mtime,
        "names": names.hexdigest(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    """Where decoded datasets are cached: $SELFSUP_CACHE_DIR, else ~/.cache/selfsup/decoded."""
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_DECODED_CACHE).expanduser()


def _cache_path(cache_dir: str | None, label: str, key: str) -> Path:
    """A readable file name (sanitized label) plus the hash key."""
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:40] or "data"
    return directory / f"{slug}-{key}.pt"


def _read_cache(path: Path, name: str) -> ImageArrayDataset | None:
    """Load a cached dataset; anything unreadable or malformed is ignored (and later rebuilt)."""
    if not path.is_file():
        return None
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        dataset = ImageArrayDataset(
            payload["images"],
            payload["labels"],
            [str(c) for c in payload["classes"]],
            name=name,
            skipped=int(payload["skipped"]),
            skipped_examples=[str(p) for p in payload["skipped_examples"]],
        )
    except Exception as exc:  # corrupt, truncated or foreign file: rebuild rather than fail
        logger.warning("ignoring unreadable decoded-data cache %s (%s); rebuilding it", path, exc)
        return None
    logger.info("loaded decoded %s from cache %s", name, path)
    return dataset


def _write_cache(path: Path, dataset: ImageArrayDataset) -> None:
    """Save atomically (temp file + os.replace) so a crash never leaves a half-written cache."""
    payload = {
        "images": dataset.images,
        "labels": dataset.labels,
        "classes": dataset.classes,
        "skipped": dataset.skipped,
        "skipped_examples": dataset.skipped_examples,
    }
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:  # a read-only or full disk only costs speed next time
        logger.warning("could not write decoded-data cache %s: %s", path, exc)
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.remove(tmp_name)
