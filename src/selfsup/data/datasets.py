"""In-memory image datasets: the embedded CIFAR-10 subset, torchvision datasets and image folders.

Everything is decoded once into a single uint8 tensor of shape N x 3 x H x W.
Self-supervised methods read every image many times per run (several augmented
views per epoch), so paying the JPEG decode once and then indexing a tensor is
far cheaper than decoding files inside a DataLoader on every access. Decoded
folders and resized torchvision datasets are cached on disk (see `cache.py`) so
a second run starts in seconds.

Whatever a folder holds that cannot become a sample is left out and counted by
reason, never silently: unreadable files, images over the pixel limit (checked
in the header, before decoding), and symbolic links to folders already read.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from selfsup.data.cache import cache_path, read_cache, state_key, where_key, write_cache
from selfsup.data.headers import image_size
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
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
SPLIT_FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "test": ("test", "val", "validation"),
}
DEFAULT_DATASETS_ROOT = "~/.cache/selfsup/datasets"
# Images whose header declares more pixels are skipped before decoding: PIL's default
# decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS), 256 MiB once decoded as RGB.
MAX_IMAGE_PIXELS = 89_478_485
MAX_PIXELS_ENV_VAR = "SELFSUP_MAX_IMAGE_PIXELS"
# Reasons a file or link is left out of a folder dataset (keys of ImageArrayDataset.skip_reasons).
UNREADABLE = "unreadable"
TOO_MANY_PIXELS = "over the pixel limit"
LINK_ALREADY_READ = "link to a folder already read"
UNREADABLE_FOLDER = "unreadable folder"
PROGRESS_BAR_MIN_FILES = 2000
MAX_SKIPPED_EXAMPLES = 5
RESIZE_CHUNK = 1024
MAP_CHUNK = 64

_T = TypeVar("_T")
_R = TypeVar("_R")


class ImageArrayDataset(Dataset):
    """A whole dataset held as one contiguous uint8 tensor plus int64 labels.

    `labels` is -1 for unlabeled samples and `classes` is empty when nothing
    is labeled. `skipped` / `skipped_examples` record the files (and links) left
    out of a folder, so callers can report them instead of silently losing data;
    `skip_reasons` splits `skipped` by reason (e.g. {"unreadable": 2}).
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
        skip_reasons: Mapping[str, int] | None = None,
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
        self.skip_reasons = dict(skip_reasons or {})
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

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of samples ``index``: one ``index_select`` per tensor."""
        return {"images": self.images.index_select(0, index), "labels": self.labels.index_select(0, index),
                "index": index}

    def subset(self, keep: torch.Tensor, name: str) -> ImageArrayDataset:
        """The samples at the positions `keep`, in that order, with this dataset's skip records."""
        return ImageArrayDataset(self.images[keep], self.labels[keep], self.classes, name=name, skipped=self.skipped,
                                 skipped_examples=self.skipped_examples, skip_reasons=self.skip_reasons)

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
    cache_file = None
    if target is not None:
        data_dir = root_dir / _torchvision_class(name).base_folder
        data_files = sorted(p for p in data_dir.rglob("*") if p.is_file()) if data_dir.is_dir() else []
        if data_files:
            where = where_key(kind=name, path=str(data_dir), split=split, decode_size=target)
            cache_file = cache_path(cache_dir, name, where, state_key(data_files))
            cached = _load_cached(cache_file, dataset_name)
            if cached is not None:
                return cached
    images, labels, classes = _read_torchvision(name, root_dir, split, download)
    if target is not None:
        _check_memory(len(labels), target, target, max_memory_gib, dataset_name)
        images = _resize_uniform(images, target)
    dataset = ImageArrayDataset(images, labels, classes, name=dataset_name)
    if cache_file is not None:
        _save_cached(cache_file, dataset)
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
    skips = _Skips()
    files, labels, classes = _scan_folder(directory, skips)
    max_pixels = max_image_pixels()
    dataset_name = f"{root.name}:{split}"
    # Keyed on the resolved folder, not the split name: splits that share a folder share the cache.
    where = where_key(kind="folder", path=str(directory), decode_size=decode_size)
    state = state_key(files, labels, classes, max_pixels, skips.counts, skips.examples)
    label = root.name if directory == root else f"{root.name}-{directory.name}"
    cache_file = cache_path(cache_dir, label, where, state)
    cached = _load_cached(cache_file, dataset_name)
    if cached is not None:
        _warn_cached_skips(cached, directory)
        return cached
    _check_folder_memory(files, decode_size, max_memory_gib, directory, max_pixels)
    images, labels = _decode_files(files, labels, decode_size, max_pixels, directory, skips)
    _warn_skips(skips, directory, max_pixels)
    height, width = images[0].shape[-2:]
    _check_memory(len(images), height, width, max_memory_gib, str(directory))
    dataset = ImageArrayDataset(
        _stack_releasing(images),
        torch.tensor(labels, dtype=torch.int64),
        classes,
        name=dataset_name,
        skipped=skips.total,
        skipped_examples=skips.first_examples(),
        skip_reasons=skips.counts,
    )
    _save_cached(cache_file, dataset)
    return dataset


def max_image_pixels() -> int:
    """The largest width x height a folder image may declare: $SELFSUP_MAX_IMAGE_PIXELS, else MAX_IMAGE_PIXELS."""
    value = os.environ.get(MAX_PIXELS_ENV_VAR, "").strip()
    if not value:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise DataError(f"{MAX_PIXELS_ENV_VAR} must be a positive whole number of pixels, got {value!r}")
    return limit


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


class _Skips:
    """Files and links left out of a folder dataset: counts by reason, and the paths of the first few."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, path: str) -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_SKIPPED_EXAMPLES:
            examples.append(path)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def first_examples(self) -> list[str]:
        """Up to MAX_SKIPPED_EXAMPLES paths, taking each reason's in turn."""
        return [path for paths in self.examples.values() for path in paths][:MAX_SKIPPED_EXAMPLES]


class _FolderWalker:
    """Lists the image files below the class folders of one data folder, reading each folder once.

    Symbolic links are a common way to assemble a dataset (train/cat -> /archive/cats), so
    they are followed; but a link whose target lies inside the folder being scanned only
    repeats images already listed (under another label), and a link to a folder already read
    is a loop or a duplicate: `os.walk(followlinks=True)` turned 20 images into 820 samples
    through one loop. Neither is followed; each is recorded in `skips`.
    """

    def __init__(self, top: Path, skips: _Skips) -> None:
        self.top = os.path.realpath(top)
        self.skips = skips
        self.seen: set[tuple[int, int]] = set()

    def images_below(self, folder: str) -> list[str]:
        """Image files under `folder`, recursively, sorted, skipping hidden entries.

        Plain strings, not Path objects: building and sorting 50,000+ Paths costs seconds.
        """
        found: list[str] = []
        pending = [folder] if self._enter(folder) else []
        while pending:
            for entry in self._list(pending.pop()):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if self._enter(entry.path):
                        pending.append(entry.path)
                elif _is_image(entry.name):  # broken links too: the decoder counts them as unreadable
                    found.append(entry.path)
        return sorted(found)

    def _enter(self, folder: str) -> bool:
        """Whether to read `folder`: once per real folder, and links only to folders outside the data."""
        try:
            stat = os.stat(folder)
        except OSError:
            self.skips.add(UNREADABLE_FOLDER, folder)
            return False
        key = (stat.st_dev, stat.st_ino)
        real = os.path.realpath(folder)
        into_data = os.path.islink(folder) and (real == self.top or real.startswith(os.path.join(self.top, "")))
        if into_data or key in self.seen:
            self.skips.add(LINK_ALREADY_READ, folder)
            return False
        self.seen.add(key)
        return True

    def _list(self, folder: str) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(folder) as entries:
                return list(entries)
        except OSError:  # permissions: say so rather than silently losing a subtree
            self.skips.add(UNREADABLE_FOLDER, folder)
            return []


def _scan_folder(directory: Path, skips: _Skips) -> tuple[list[str], list[int], list[str]]:
    """List image files with labels: class subfolders give ImageFolder labels, a flat folder gives -1."""
    entries = sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))
    if not entries:
        raise DataError(
            f"data folder {directory} is empty; expected images in class subfolders "
            f"({directory}/<class>/<image>.jpg) or directly in it"
        )
    walker = _FolderWalker(directory, skips)
    per_class = {entry.name: walker.images_below(str(entry)) for entry in entries if entry.is_dir()}
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


class _TooManyPixels(Exception):
    """The header declares more pixels than the limit; nothing was decoded."""


def _decode_file(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, bool]:
    """Decode one image to uint8 3 x H x W RGB; the flag is True when it was the first frame of several.

    The size in the header is checked before any pixel is decoded (torchvision's decoders have
    no limit). GIFs go to PIL, which decodes only the first frame where torchvision decodes them
    all; other formats use torchvision (fast) and fall back to PIL for what it cannot read.
    """
    return _decode_data(read_file(path), max_pixels)


def _decode_data(data: torch.Tensor, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, bool]:
    """``_decode_file`` on a file's bytes already read (a 1-D uint8 tensor): a member of a shard."""
    raw = data.numpy()
    size = image_size(memoryview(raw))
    if size is not None:
        _check_pixels(size, max_pixels)
    if raw[:3].tobytes() == b"GIF":
        image, animated = _decode_with_pil(raw, max_pixels)
    else:
        try:
            image, animated = decode_image(data, mode=ImageReadMode.RGB), False
        except RuntimeError:
            image, animated = _decode_with_pil(raw, max_pixels)
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image, animated


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise _TooManyPixels(f"{width}x{height}")


def _decode_with_pil(raw: np.ndarray, max_pixels: int) -> tuple[torch.Tensor, bool]:
    """PIL fallback (GIF, BMP variants, animated WebP): the first frame only; truncated files still fail."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as handle:
        _check_pixels(handle.size, max_pixels)  # formats the header reader does not know
        array = np.asarray(handle.convert("RGB"))
        animated = bool(getattr(handle, "is_animated", False))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), animated


def _decode_or_skip(path: str, decode_size: int | None, max_pixels: int,
                    data: torch.Tensor | None = None) -> tuple[torch.Tensor | None, str]:
    """Decode and optionally resize one file (or its bytes ``data``, already read; ``path`` then only
    names it); returns (image, "") or (image, "animated") or (None, skip reason)."""
    try:
        image, animated = _decode_file(path, max_pixels) if data is None else _decode_data(data, max_pixels)
    except _TooManyPixels as exc:
        logger.debug("not decoding %s: %s pixels is over the limit of %d", path, exc, max_pixels)
        return None, TOO_MANY_PIXELS
    except Exception as exc:  # any decoder failure means "corrupt file": count it, keep going
        logger.debug("cannot decode %s: %s", path, exc)
        return None, UNREADABLE
    image = image if decode_size is None else _resize_and_crop(image, decode_size)
    return image, "animated" if animated else ""


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


def _decode_files(
    files: list[str],
    labels: list[int],
    decode_size: int | None,
    max_pixels: int,
    directory: Path,
    skips: _Skips,
) -> tuple[list[torch.Tensor], list[int]]:
    """Decode every file, record the skipped ones in `skips`, and bring the rest to one size."""
    decoded = _parallel_map(
        lambda path: _decode_or_skip(path, decode_size, max_pixels), files, f"decoding {directory.name}"
    )
    for path, (image, status) in zip(files, decoded):
        if image is None:
            skips.add(status, path)
    kept = [i for i, (image, _) in enumerate(decoded) if image is not None]
    if not kept:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skips.counts.items())
        raise DataError(
            f"none of the {len(files)} image files in {directory} could be decoded ({reasons}; "
            f"e.g. {skips.first_examples()[0]}); check that they are valid images"
        )
    animated = sum(status == "animated" for _, status in decoded)
    if animated:
        logger.info("%s: used the first frame of %d animated image(s)", directory, animated)
    images = [image for image, _ in decoded if image is not None]
    del decoded  # the per-image tensors must be freed while they are stacked
    return _unify_sizes(images, directory), [labels[i] for i in kept]


def _warn_skips(skips: _Skips, directory: Path, max_pixels: int) -> None:
    """One warning per reason, naming up to MAX_SKIPPED_EXAMPLES of the paths left out for it."""
    messages = {
        UNREADABLE: "skipped {n} unreadable image(s) in {dir}",
        TOO_MANY_PIXELS: (
            "skipped {n} image(s) in {dir} whose header declares more than {limit:,} pixels, without decoding "
            "them (set " + MAX_PIXELS_ENV_VAR + " to change the limit)"
        ),
        LINK_ALREADY_READ: (
            "did not follow {n} symbolic link(s) in {dir} to folders already part of the data (a loop or a "
            "duplicate; each folder is read once, so no link is followed twice)"
        ),
        UNREADABLE_FOLDER: "could not list {n} folder(s) in {dir}",
    }
    for reason, count in skips.counts.items():
        examples = skips.examples[reason]
        shown = ", ".join(examples) + (", ..." if count > len(examples) else "")
        logger.warning("%s: %s", messages[reason].format(n=count, dir=directory, limit=max_pixels), shown)


def _warn_cached_skips(dataset: ImageArrayDataset, directory: Path) -> None:
    """Repeat, in one line, what was left out when the cached copy was built (the files are not read again)."""
    if dataset.skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in dataset.skip_reasons.items())
        logger.warning(
            "%d file(s) or link(s) in %s were left out (%s): %s%s",
            dataset.skipped,
            directory,
            reasons or "unreadable",
            ", ".join(dataset.skipped_examples),
            ", ..." if dataset.skipped > len(dataset.skipped_examples) else "",
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
            "(e.g. 64 or 96), or stream a folder from disk (data.mode=stream)."
        )


def _check_folder_memory(
    files: list[str], decode_size: int | None, max_memory_gib: float, directory: Path, max_pixels: int
) -> None:
    """Estimate the decoded size before decoding: exact with decode_size, else from sampled headers."""
    if decode_size is not None:
        _check_memory(len(files), decode_size, decode_size, max_memory_gib, str(directory))
        return
    sizes = [size for size in _sample_sizes(files, samples=16) if size[0] * size[1] <= max_pixels]
    sizes.sort(key=lambda size: size[0] * size[1])
    if sizes:
        height, width = sizes[len(sizes) // 2]
        _check_memory(len(files), height, width, max_memory_gib, str(directory))


def _sample_sizes(files: Sequence[str], samples: int) -> list[tuple[int, int]]:
    """Read (H, W) from the headers of evenly spaced files; no pixel is decoded for this."""
    step = max(1, len(files) // samples)
    sizes = []
    for path in files[::step][:samples]:
        try:
            with open(path, "rb") as stream:
                size = image_size(stream.read())
        except OSError:  # unreadable files are reported later by the real decode
            continue
        if size is not None:
            sizes.append((size[1], size[0]))
    return sizes


# --------------------------------------------------------------------------- decoded cache


def _load_cached(path: Path, name: str) -> ImageArrayDataset | None:
    """The dataset cached at `path` when it is there and intact (see cache.read_cache), else None."""
    payload = read_cache(path)
    if payload is None:
        return None
    try:
        dataset = ImageArrayDataset(
            payload["images"],
            payload["labels"],
            [str(c) for c in payload["classes"]],
            name=name,
            skipped=int(payload["skipped"]),
            skipped_examples=[str(p) for p in payload["skipped_examples"]],
            skip_reasons={str(reason): int(count) for reason, count in payload["skip_reasons"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a checksummed file of the wrong shape
        logger.warning("ignoring malformed decoded-data cache %s (%s); rebuilding it", path, exc)
        return None
    logger.info("loaded decoded %s from cache %s", name, path)
    return dataset


def _save_cached(path: Path, dataset: ImageArrayDataset) -> None:
    """Write the dataset's tensors and skip records to the decoded cache."""
    write_cache(
        path,
        {
            "images": dataset.images,
            "labels": dataset.labels,
            "classes": dataset.classes,
            "skipped": dataset.skipped,
            "skipped_examples": dataset.skipped_examples,
            "skip_reasons": dataset.skip_reasons,
        },
    )
