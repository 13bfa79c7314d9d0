"""The source protocol, and the streaming image source for folders larger than memory.

A *source* is a sized sequence of samples, indexable by an integer in ``range(len(source))``:

- a **sample** is a dict of tensors: ``images`` uint8 (3, h, w) at the image's own size,
  ``labels`` an int64 scalar (-1 where unlabeled) and ``index`` the int64 position of the
  sample in the source;
- a **batch** is a dict of the samples' tensors stacked along a new first dimension. Images of
  different sizes are padded with zeros at the bottom and right to the batch's largest (H, W),
  and ``image_sizes`` (B, 2) int64 then gives each image's own (h, w); a batch whose images all
  share one size has no ``image_sizes`` (nothing is padded). Augmentation reads ``image_sizes``
  so that every crop is drawn inside its own image (``Augment(images, image_sizes=...)``);
- every source exposes ``name``, ``classes`` (empty when unlabeled), ``has_labels``, and what it
  left out: ``skipped`` (count), ``skip_reasons`` (count per reason) and ``skipped_examples``
  (the first few paths).

Two sources exist: :class:`~selfsup.data.datasets.ImageArrayDataset`, the whole set decoded into
one tensor (the memory path, batched by ``BatchLoader`` with one ``index_select``), and
:class:`FolderStream`, which only lists a folder and decodes one file per ``__getitem__`` in
``DataLoader`` workers (batched by ``StreamLoader``). Both loaders take the same order from
(seed, epoch), so the two paths give the same samples in the same order.

A file that turns out to be unreadable (or declares more pixels than the limit) when a worker
decodes it is replaced by the next readable file of the listing, and counted: batches keep
their size, which every rank's collective operations (SimCLR's gathered negatives, MoCo's
queue) rely on, and the run never stops for one bad file.

Not built yet: batched JPEG decoding on the GPU. Its place is marked: the workers would return
each file's bytes (``torchvision.io.read_file``) instead of calling ``FolderStream.decode``, the
collate would keep them as a list, and ``StreamLoader._checked`` (the main process, once per
batch) would decode the list with ``torchvision.io.decode_jpeg(..., device="cuda")`` and pad it,
falling back to ``decode`` on the CPU for what the GPU decoder refuses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from selfsup.data.cache import state_key
from selfsup.data.datasets import (
    UNREADABLE,
    _decode_or_skip,
    _resolve_split_dir,
    _scan_folder,
    _Skips,
    _warn_skips,
    max_image_pixels,
)
from selfsup.errors import DataError
from selfsup.pretext.augment import _eval_resize_side, pad_images

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIDE = 512
"""Longest side a streamed image is decoded to (larger ones are shrunk, keeping their aspect).
ImageNet's training JPEGs are nearly all at most 500 px on their long side, so they are used as
stored, as the papers do; the cap bounds the padded batch (B x 3 x 512 x 512 uint8 at most)
when a folder holds camera-sized photos."""

SUBSTITUTE_TRIES = 16
"""Files after an unreadable one tried as its replacement before the batch is refused."""

MAX_SKIP_WARNINGS = 5
"""Unreadable files named one by one in the log; later ones are only counted."""


class ImageStream(Dataset):
    """What every streamed image source shares (see the module docstring): the sample protocol,
    the replacement of unreadable items by the next readable one, the skip counts, and the
    decoding geometry.

    A subclass stores its items and implements ``__len__``, ``path(index)`` (a name for messages),
    ``read(index)`` (the item's encoded bytes, a 1-D uint8 tensor), ``subset`` and ``fingerprint``;
    it may override ``epoch_order`` (the shuffled order of one epoch) to keep reads local, and
    ``load`` (one item's tensors) when its items are not encoded images.
    """

    def __init__(self, labels: torch.Tensor, classes: Sequence[str], *, name: str, max_side: int | None,
                 eval_size: int | None, max_pixels: int | None, skips: _Skips | None, directory: str) -> None:
        self.labels = labels
        self.classes = list(classes)
        self.name = name
        self.max_side = max_side
        self.eval_size = eval_size
        self.max_pixels = max_image_pixels() if max_pixels is None else max_pixels
        self._skips = skips or _Skips()
        self.directory = directory  # the folder listed, for messages
        self._skipped_items: set[int] = set()
        self._fingerprint: str | None = None

    # ---- the source protocol -----------------------------------------------------------

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample at ``index``; an unreadable item gives the next readable one instead.

        ``skipped`` lists the (index, reason) of every item passed over; ``unusable`` is set
        (and ``images`` absent) when SUBSTITUTE_TRIES items in a row could not be decoded.
        """
        skipped: list[tuple[int, str]] = []
        for step in range(SUBSTITUTE_TRIES + 1):
            position = (index + step) % len(self)
            sample, status = self.load(position)
            if sample is not None:
                sample["index"] = torch.tensor(position, dtype=torch.int64)
                sample["skipped"] = skipped
                return sample
            skipped.append((position, status))
        return {"unusable": index, "skipped": skipped}

    def load(self, index: int) -> tuple[dict[str, Any] | None, str]:
        """(the sample's tensors, "") for item ``index``, or (None, the reason it is skipped)."""
        image, status = self.decode(index)
        if image is None:
            return None, status
        # fresh scalars: a view into self.labels would carry its whole storage along
        return {"images": image, "labels": torch.tensor(int(self.labels[index]), dtype=torch.int64)}, ""

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """The order of one shuffled epoch: a uniform permutation of every sample."""
        return torch.randperm(len(self), generator=generator)

    @property
    def has_labels(self) -> bool:
        """True when there are classes and every sample carries a label (what linear evaluation needs)."""
        return bool(self.classes) and len(self) > 0 and bool((self.labels >= 0).all())

    @property
    def skipped(self) -> int:
        """Items left out: those the listing passed over, and unreadable items met so far."""
        return self._skips.total

    @property
    def skip_reasons(self) -> dict[str, int]:
        return dict(self._skips.counts)

    @property
    def skipped_examples(self) -> list[str]:
        return self._skips.first_examples()

    # ---- items ---------------------------------------------------------------------------

    def path(self, index: int) -> str:
        """A name for item ``index`` in messages (its file, or shard and member)."""
        raise NotImplementedError

    def read(self, index: int) -> torch.Tensor | None:
        """The encoded bytes of item ``index``; None where the caller should read ``path`` itself."""
        return None

    def decode(self, index: int) -> tuple[torch.Tensor | None, str]:
        """(uint8 3 x h x w image, "") for sample ``index``, or (None, the reason it is skipped).

        The size in the header is checked against the pixel limit before decoding (as the
        memory path does); then the long side is capped at ``max_side``, or the image is
        prepared for evaluation at ``eval_size``.
        """
        try:
            data = self.read(index)
        except OSError as exc:
            logger.debug("cannot read %s: %s", self.path(index), exc)
            return None, UNREADABLE
        image, status = _decode_or_skip(self.path(index), None, self.max_pixels, data)
        if image is None:
            return None, status
        if self.eval_size is not None:
            return _eval_resize_crop(image, self.eval_size), ""
        return _cap_long_side(image, self.max_side), ""

    def warn_skipped(self) -> None:
        """Log what the listing left out (links to folders already read, unreadable folders), one line per reason."""
        _warn_skips(self._skips, Path(self.directory), self.max_pixels)

    def record_skips(self, skipped: Sequence[tuple[int, str]]) -> None:
        """Count items a worker found unreadable (each item once, however often it is met)."""
        for index, reason in skipped:
            if index in self._skipped_items:
                continue
            self._skipped_items.add(index)
            self._skips.add(reason or UNREADABLE, self.path(index))
            if len(self._skipped_items) <= MAX_SKIP_WARNINGS:
                logger.warning("skipped %s (%s); the next readable item takes its place in the batch",
                               self.path(index), reason)

    def _copied_skips(self) -> _Skips:
        """The listing's records, copied for a subset, which counts its own unreadable items."""
        skips = _Skips()
        skips.counts.update(self._skips.counts)
        skips.examples = {reason: list(paths) for reason, paths in self._skips.examples.items()}
        return skips

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, classes={len(self.classes)}, "
                f"skipped={self.skipped})")


class PackedPaths:
    """File paths held in one numpy byte buffer, not a list of Python strings: DataLoader workers are forked, and
    touching a Python object writes its reference count, which would copy every page of a million-path list into
    every worker. ``paths[i]`` is path i; ``len(paths)`` their number."""

    def __init__(self, files: Sequence[str]) -> None:
        encoded = [path.encode("utf-8", "surrogateescape") for path in files]
        self._offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._bytes[start:end].tobytes().decode("utf-8", "surrogateescape")


class FolderStream(ImageStream):
    """An image folder read file by file: the streaming source (see the module docstring).

    Constructing it lists the files (no image is opened); ``__getitem__`` decodes one file to
    uint8 RGB. Without ``eval_size`` the whole image is kept, shrunk to at most ``max_side``
    pixels on its long side (None: no cap); with ``eval_size`` it is prepared for evaluation
    as ``eval_transform`` does (antialiased resize of the shorter side, centre crop to
    ``eval_size`` x ``eval_size``), so evaluation batches stack without padding.

    Paths are held in one numpy byte buffer (:class:`PackedPaths`), not a list of Python strings.
    """

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        classes: Sequence[str] = (),
        *,
        name: str = "",
        max_side: int | None = DEFAULT_MAX_SIDE,
        eval_size: int | None = None,
        max_pixels: int | None = None,
        listing_skips: _Skips | None = None,
        directory: str = "",
    ) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        super().__init__(torch.as_tensor(list(labels), dtype=torch.int64), classes, name=name, max_side=max_side,
                         eval_size=eval_size, max_pixels=max_pixels, skips=listing_skips, directory=directory)
        self._paths = PackedPaths(files)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        """The file of sample ``index``."""
        return self._paths[index]

    def paths(self) -> list[str]:
        """Every file, in order (a list: for subsets and fingerprints, not for workers)."""
        return [self.path(i) for i in range(len(self))]

    def subset(self, keep: torch.Tensor, name: str) -> FolderStream:
        """The samples at the positions ``keep``, in that order (``data.limit``)."""
        return FolderStream([self.path(i) for i in keep.tolist()], self.labels[keep].tolist(), self.classes,
                            name=name, max_side=self.max_side, eval_size=self.eval_size, max_pixels=self.max_pixels,
                            listing_skips=self._copied_skips(), directory=self.directory)

    @property
    def fingerprint(self) -> str:
        """What identifies the data: every file's path and stat (see cache.state_key) and the decoding."""
        if self._fingerprint is None:
            self._fingerprint = state_key(self.paths(), self.labels.tolist(), self.classes, self.max_side,
                                          self.eval_size, self.max_pixels)
        return self._fingerprint


def open_folder_stream(
    source: str,
    split: str = "train",
    *,
    max_side: int | None = DEFAULT_MAX_SIDE,
    eval_size: int | None = None,
    warn: bool = True,
) -> FolderStream:
    """List an ImageFolder-style or flat folder (the same walker and split rules as
    ``load_dataset``) as a :class:`FolderStream`; nothing is decoded here. With ``warn``, what
    the listing left out (links to folders already read, unreadable folders) is logged."""
    root = Path(source).expanduser().resolve()
    directory = _resolve_split_dir(root, split)
    skips = _Skips()
    files, labels, classes = _scan_folder(directory, skips)
    stream = FolderStream(files, labels, classes, name=f"{root.name}:{split}", max_side=max_side,
                          eval_size=eval_size, listing_skips=skips, directory=str(directory))
    if warn:
        stream.warn_skipped()
    return stream


def _cap_long_side(image: torch.Tensor, max_side: int | None) -> torch.Tensor:
    """Shrink (antialiased bilinear) so the long side is at most ``max_side``, keeping the aspect."""
    height, width = image.shape[-2:]
    if max_side is None or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    return TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)


def _eval_resize_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """``eval_transform``'s geometry on one uint8 image: shorter side to the eval side, centre crop."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    resized = TF.resize(image, [_eval_resize_side(size)], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(resized, [size, size]).contiguous()


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch (see the module docstring), padding images of different sizes.

    ``skipped`` (the (index, reason) pairs of files passed over) and ``unusable`` (samples for
    which no readable file was found) ride along for the loader, which removes them.
    """
    skipped = [pair for sample in samples for pair in sample["skipped"]]
    unusable = [sample["unusable"] for sample in samples if "unusable" in sample]
    samples = [sample for sample in samples if "unusable" not in sample]
    batch: dict[str, Any] = {"skipped": skipped, "unusable": unusable}
    if not samples:
        return batch
    for key in samples[0]:  # every other modality's tensors, labels and index: stacked as they are
        if key in ("images", "skipped"):
            continue
        try:
            batch[key] = torch.stack([sample[key] for sample in samples])
        except (RuntimeError, KeyError) as exc:
            raise DataError(f"the samples' {key!r} cannot be stacked into a batch ({exc}); give every sample the "
                            "same keys and shapes (pad sequences in the dataset)") from None
    if "images" not in samples[0]:
        return batch
    batch["images"], sizes = pad_images([sample["images"] for sample in samples])
    if sizes is not None:
        batch["image_sizes"] = sizes
    return batch


__all__ = ["DEFAULT_MAX_SIDE", "FolderStream", "ImageStream", "PackedPaths", "collate_samples", "open_folder_stream"]
