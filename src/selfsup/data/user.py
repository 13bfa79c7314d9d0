"""Training on the user's own data from Python: ``selfsup.Trainer(cfg).fit(data=...)``.

Two shapes are taken, and given the trainer's guarantees (the same checkpoints, exact resume):

- a **map-style Dataset of samples** (anything with ``__len__`` and ``__getitem__`` that is not a
  DataLoader): each item is a dict named by its modality's key (``{"images": ..., "labels": 3}``)
  or, as torchvision datasets give them, an ``(image, label)`` pair or a bare image. Images may be
  PIL images, HWC or CHW numpy arrays or tensors, uint8 or float in [0, 1]; they become uint8
  (3, H, W). It is read by the streaming loader (``StreamLoader``): shuffled from (seed, epoch),
  equal shares per rank, ``data.workers`` worker processes, an item whose ``__getitem__`` raises
  replaced by the next one and counted, exact mid-epoch resume;
- any other **iterable of batches** (a DataLoader, an IterableDataset, a generator function's
  iterable): each element is a batch dict or an ``(images, labels)`` pair with a leading batch
  dimension. An epoch is one pass (``len`` when it has one; without, ``trainer.max_steps`` sets
  the length and the iterable is restarted when it ends). Order and shuffling are the iterable's
  own: a resume skips the batches already trained on by iterating past them, which continues
  exactly when the iterable gives the same batches in the same order each time it is iterated.

A sample or batch of the wrong modality for the method is refused in one line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from selfsup.data.sources import ImageStream
from selfsup.errors import ConfigError, DataError

IMAGES = "images"


def as_uint8_image(value: Any, batched: bool = False) -> torch.Tensor:
    """A PIL image, numpy array or tensor as uint8 (3, H, W) (``batched``: (B, 3, H, W)).

    Channels-last arrays (H, W, C) are permuted, one channel is repeated to three, floats are
    taken as [0, 1] and rounded to 0..255."""
    if hasattr(value, "convert") and hasattr(value, "size") and not isinstance(value, (np.ndarray, torch.Tensor)):
        value = np.array(value.convert("RGB"))  # PIL (a writable copy: torch warns on read-only arrays)
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        value = value.copy()
    tensor = torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
    dims = 4 if batched else 3
    if tensor.ndim == dims - 1:  # grayscale without a channel axis
        tensor = tensor.unsqueeze(-3)
    if tensor.ndim != dims:
        what = "batch of images" if batched else "image"
        hint = "; give a Dataset of samples, or an iterable of batches" if tensor.ndim == dims + 1 or batched else ""
        raise DataError(f"expected an {what} with {dims} dims ({'B, ' if batched else ''}C, H, W), got shape "
                        f"{tuple(tensor.shape)}{hint}")
    if tensor.shape[-3] not in (1, 3) and tensor.shape[-1] in (1, 3):  # channels last
        tensor = tensor.movedim(-1, -3)
    if tensor.shape[-3] == 1:
        tensor = tensor.expand(*tensor.shape[:-3], 3, *tensor.shape[-2:])
    if tensor.shape[-3] != 3:
        raise DataError(f"an image needs 1 or 3 channels, got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point():
        tensor = (tensor.clamp(0, 1) * 255).round()
    return tensor.to(torch.uint8).contiguous()


def _labels(value: Any, batched: bool) -> torch.Tensor:
    labels = torch.as_tensor(value, dtype=torch.int64)
    return labels if batched else labels.reshape(())


def to_sample(item: Any) -> dict[str, torch.Tensor]:
    """One item of a user's Dataset as a sample dict (see the module docstring)."""
    return _to_dict(item, batched=False)


def to_batch(item: Any) -> dict[str, torch.Tensor]:
    """One element of a user's iterable of batches as a batch dict (see the module docstring)."""
    return _to_dict(item, batched=True)


def _to_dict(item: Any, batched: bool) -> dict[str, torch.Tensor]:
    if isinstance(item, Mapping):
        out = {str(k): v for k, v in item.items()}
    elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 2:
        out = {IMAGES: item[0]} if len(item) == 1 else {IMAGES: item[0], "labels": item[1]}
    else:
        out = {IMAGES: item}
    if IMAGES in out:
        out[IMAGES] = as_uint8_image(out[IMAGES], batched)
    if "labels" in out:
        out["labels"] = _labels(out["labels"], batched)
    elif not batched:
        out["labels"] = torch.tensor(-1, dtype=torch.int64)
    for key, value in out.items():
        if not isinstance(value, torch.Tensor):
            try:
                out[key] = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise DataError(f"the data's {key!r} values are not tensors ({type(value).__name__}): {exc}") from None
    return out


def _check_modality(method: Any, example: Mapping[str, Any]) -> None:
    from selfsup.registry import check_batch

    modality = getattr(method, "modality", None)  # an instance trains on one (a class: any it accepts)
    check_batch(method.name, (modality,) if isinstance(modality, str) else method.modalities, example)


class SampleSource(ImageStream):
    """A user's map-style Dataset as a streamed source (see the module docstring)."""

    def __init__(self, data: Any, name: str = "") -> None:
        n = len(data)
        super().__init__(torch.full((n,), -1, dtype=torch.int64), (), name=name or type(data).__name__,
                         max_side=None, eval_size=None, max_pixels=None, skips=None, directory=name)
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def path(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def load(self, index: int) -> tuple[dict[str, Any] | None, str]:
        """The item at ``index`` as a sample. An item whose ``__getitem__`` raises is skipped (the
        base class substitutes and counts it), but a sample of the wrong shape is an error: it is
        the Dataset's, not the data's."""
        try:
            item = self.data[index]
        except Exception as exc:  # a bad file behind the user's Dataset: count it, keep going
            return None, f"{type(exc).__name__}: {exc}"[:200]
        return to_sample(item), ""

    def subset(self, keep: torch.Tensor, name: str) -> SampleSource:
        return SampleSource(Subset(self.data, keep.tolist()), name)

    @property
    def fingerprint(self) -> str:
        raise DataError(f"{self.name} is a Python Dataset: it has no fingerprint to cache its features by")


class BatchIterable:
    """A user's iterable of batches (see the module docstring); ``loader`` makes its training loader."""

    def __init__(self, data: Iterable, name: str = "") -> None:
        self.data = data
        self.name = name or type(data).__name__
        try:
            self.batches: int | None = len(data)  # type: ignore[arg-type]
        except TypeError:
            self.batches = None
        self.batch_size = 0  # set by loader()
        self.skipped, self.skip_reasons = 0, {}

    def __len__(self) -> int:
        """Samples per epoch (batches x batch size), once ``loader`` has set the length."""
        return (self.batches or 0) * self.batch_size

    def loader(self, cfg: Any, per_rank: int) -> IterableLoader:
        if self.batches is None:
            if cfg.trainer.max_steps is None:
                raise ConfigError(f"{self.name} has no length, so no epochs: set trainer.max_steps")
            self.batches = cfg.trainer.max_steps * cfg.trainer.accumulate
        self.batch_size = per_rank
        return IterableLoader(self, per_rank)


class IterableLoader:
    """The loader contract (``set_epoch``, ``set_start_batch``, ``len``, ``close``) over a BatchIterable."""

    def __init__(self, source: BatchIterable, batch_size: int) -> None:
        self.source = source
        self.batch_size = batch_size
        self.workers = int(getattr(source.data, "num_workers", 0) or 0)
        self.epoch, self._start = 0, 0

    def __len__(self) -> int:
        return int(self.source.batches or 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        set_epoch = getattr(self.source.data, "set_epoch", None)
        if callable(set_epoch):  # IterableDatasets that reshuffle per epoch
            set_epoch(epoch)

    def set_start_batch(self, start_batch: int) -> None:
        self._start = start_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start, self._start = self._start, 0
        it = iter(self.source.data)
        given = 0
        for position in range(len(self)):
            try:
                item = next(it)
            except StopIteration:
                it = iter(self.source.data)  # a pass ended before the epoch's length: start the next
                try:
                    item = next(it)
                except StopIteration:
                    raise DataError(f"{self.source.name} ended after {given} batches and gives none when iterated "
                                    "again (a one-shot generator?); pass an iterable that can be iterated again, "
                                    "such as a DataLoader or an IterableDataset") from None
            given += 1
            if position < start:  # a resume: the batches trained on before the stop
                continue
            batch = to_batch(item)
            size = len(next(iter(batch.values())))
            if size != self.batch_size:
                raise ConfigError(f"the batches of {self.source.name} hold {size} samples but each rank's share of "
                                  f"data.batch_size is {self.batch_size}: set data.batch_size to the batches' size "
                                  "(times the number of processes and trainer.accumulate)")
            yield batch

    def close(self) -> None:
        """Nothing held between epochs (a DataLoader's workers end with its iterator)."""


def adapt_training_data(data: Any, cfg: Any, method: Any) -> Any:
    """``data`` as the trainer takes it: a selfsup source as it is, a map-style Dataset as a
    SampleSource, any other iterable as a BatchIterable; None stays None (the configured source).
    The first sample of a Dataset is read to check its modality against the method's."""
    from selfsup.data.datasets import ImageArrayDataset

    if data is None or isinstance(data, (ImageArrayDataset, ImageStream, BatchIterable)):
        return data
    is_map = (hasattr(data, "__len__") and hasattr(data, "__getitem__")
              and not isinstance(data, (DataLoader, IterableDataset, Mapping, str, bytes)))
    if is_map:
        if len(data) == 0:
            raise DataError(f"the {type(data).__name__} given to fit() is empty")
        source = SampleSource(data)
        _check_modality(method, to_sample(data[0]))
        return source
    if isinstance(data, (Iterable, DataLoader)):
        return BatchIterable(data)
    raise ConfigError(f"fit(data=...) takes a Dataset of samples or an iterable of batches, not {type(data).__name__}")


__all__ = ["BatchIterable", "IterableLoader", "SampleSource", "adapt_training_data", "as_uint8_image", "to_batch",
           "to_sample"]
