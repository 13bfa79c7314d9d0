"""Batches from a source: `BatchLoader` for the in-memory ImageArrayDataset, `StreamLoader`
for an ImageStream (a folder or a shard set) decoded in DataLoader workers.

In memory the images already sit in one uint8 tensor, so a batch is a single
`index_select`; collating thousands of per-item tuples through DataLoader
workers would be far slower. A streamed folder cannot be held, so there the
workers read and decode files while the training step runs. Both take their
order from (seed, epoch) alone, so every rank computes the same permutation,
a run can resume mid-epoch at an exact batch, and the memory and streaming
paths visit the same samples in the same order.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from selfsup.data.datasets import ImageArrayDataset
from selfsup.data.sources import SUBSTITUTE_TRIES, ImageStream, collate_samples
from selfsup.errors import DataError

MAX_DEFAULT_WORKERS = 8
PREFETCH_BATCHES = 4  # per worker: enough to ride out one slow file without holding many batches

_MASK64 = (1 << 64) - 1


def _mix_seed(seed: int, epoch: int) -> int:
    """Combine seed and epoch into one well-spread generator seed (splitmix64 finalizer).

    Plain `seed + epoch` would make (seed=1, epoch=0) and (seed=0, epoch=1) identical.
    """
    value = (seed * 0x9E3779B97F4A7C15 + epoch + 0x632BE59BD9B4E019) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (value ^ (value >> 31)) & ((1 << 63) - 1)


class BatchLoader:
    """Iterate an in-memory source (an ImageArrayDataset: dicts {"images", "labels", "index"}; text
    blocks or examples: {"tokens", ...}) in batches; the source's ``gather(index)`` builds each.

    With shuffle=True each epoch uses a permutation seeded by (seed, epoch),
    identical on all ranks and truncated so every rank gets the same number of
    samples; rank r takes positions r::world_size. With shuffle=False the order
    is 0..N-1 (evaluation), and drop_last=False keeps the last partial batch.
    """

    workers = 0  # batches are gathered in this process

    def __init__(
        self,
        dataset: ImageArrayDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        pin_memory: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.epoch = 0
        self._start_batch = 0
        self._check_enough_samples()

    @property
    def samples_per_rank(self) -> int:
        """Samples each rank sees per epoch (the dataset truncated to a multiple of world_size)."""
        return len(self.dataset) // self.world_size

    def _check_enough_samples(self) -> None:
        """Fail before training instead of producing epochs with zero batches."""
        per_rank = self.samples_per_rank
        if per_rank == 0:
            raise DataError(
                f"dataset {self.dataset.name or ''} has {len(self.dataset)} samples, fewer than "
                f"world_size={self.world_size}; every rank needs at least one sample"
            )
        if self.drop_last and per_rank < self.batch_size:
            raise DataError(
                f"dataset {self.dataset.name or ''} has {len(self.dataset)} samples "
                f"({per_rank} per rank with world_size={self.world_size}), fewer than one batch of "
                f"{self.batch_size}; lower the batch size or use more data"
            )

    def __len__(self) -> int:
        """Batches per epoch for this rank (ignores a pending set_start_batch)."""
        full, rest = divmod(self.samples_per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def set_start_batch(self, start_batch: int) -> None:
        """Skip the first `start_batch` batches of the next iteration only (exact mid-epoch resume)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self._start_batch = start_batch

    def indices(self) -> torch.Tensor:
        """Dataset indices this rank visits in the current epoch, in order."""
        count = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(_mix_seed(self.seed, self.epoch))
            order = self._shuffled(generator)
        else:
            order = torch.arange(count)
        usable = self.samples_per_rank * self.world_size
        return order[:usable][self.rank :: self.world_size]

    def _shuffled(self, generator: torch.Generator) -> torch.Tensor:
        """One shuffled epoch's order of the dataset's sample indices: the source's own
        ``epoch_order`` when it has one (text blocks draw their grid shift there), else a permutation."""
        epoch_order = getattr(self.dataset, "epoch_order", None)
        if epoch_order is not None:
            return epoch_order(generator)
        return torch.randperm(len(self.dataset), generator=generator)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start, self._start_batch = self._start_batch, 0
        order = self.indices()
        for batch in range(start, len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self._gather(index)

    def _gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch, gathered by the in-memory source itself (one ``index_select`` for images)."""
        batch = self.dataset.gather(index)
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def close(self) -> None:
        """Release what iterating holds (nothing here; StreamLoader stops its workers)."""


def default_workers() -> int:
    """DataLoader workers when `data.workers` is not set: one per usable core, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def _ignore_stop_signals(worker_id: int) -> None:
    """In each worker: leave Ctrl-C and SIGTERM to the training process, which stops after the step
    and saves; a worker killed by them would make the next batch an error instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _EpochBatches:
    """The batch sampler of a StreamLoader: this rank's batches of the planned epoch, from a start batch.

    One object serves every epoch, so the DataLoader (and its persistent workers) is built once.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.order = torch.zeros(0, dtype=torch.int64)
        self.start = self.count = 0

    def plan(self, order: torch.Tensor, start: int, count: int) -> None:
        """Batches ``start`` to ``count`` (the loader's ``len``) of ``order``."""
        self.order, self.start, self.count = order, start, count

    def __len__(self) -> int:
        return self.count - self.start

    def __iter__(self) -> Iterator[list[int]]:
        for batch in range(self.start, self.start + len(self)):
            yield self.order[batch * self.batch_size : (batch + 1) * self.batch_size].tolist()


class StreamLoader(BatchLoader):
    """Batches of an ImageStream (a folder, or shards) decoded by `workers` DataLoader worker processes.

    The contract is BatchLoader's: the same (seed, epoch) permutation, rank r taking positions
    r::world_size of it truncated to equal counts (so every rank runs the same number of steps
    and none waits in a collective for a batch that never comes), `set_start_batch` for exact
    mid-epoch resume; the permutation is the source's own ``epoch_order`` (shards keep reads
    local). Images arrive as uint8 at their own size, padded per batch (see
    `sources.collate_samples`); augmentation happens on the training device. Workers persist
    across epochs and prefetch PREFETCH_BATCHES batches each; `workers=0` decodes in this process.
    Unreadable files are replaced by the next readable one and counted on the source
    (`dataset.skipped`); a batch for which no readable file is found is a DataError.
    """

    def __init__(
        self,
        dataset: ImageStream,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        pin_memory: bool = False,
        workers: int | None = None,
    ) -> None:
        super().__init__(dataset, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                         drop_last=drop_last, pin_memory=pin_memory)
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = default_workers() if workers is None else workers
        self._batches = _EpochBatches(batch_size)
        self._loader: DataLoader | None = None

    def _shuffled(self, generator: torch.Generator) -> torch.Tensor:
        return self.dataset.epoch_order(generator)

    def _data_loader(self) -> DataLoader:
        if self._loader is None:
            extra: dict[str, Any] = {}
            if self.workers > 0:  # workers exit with this process or when the loader is closed
                extra = {"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES,
                         "worker_init_fn": _ignore_stop_signals}
            self._loader = DataLoader(self.dataset, batch_sampler=self._batches, num_workers=self.workers,
                                      collate_fn=collate_samples, pin_memory=self.pin_memory, **extra)
        return self._loader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start, self._start_batch = self._start_batch, 0
        self._batches.plan(self.indices(), start, len(self))
        for batch in self._data_loader():
            yield self._checked(batch)

    def _checked(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Hand the skipped files to the source's count; refuse a batch with samples no file could fill."""
        self.dataset.record_skips(batch.pop("skipped"))
        unusable = batch.pop("unusable")
        if unusable:
            raise DataError(
                f"{self.dataset.name}: none of the {SUBSTITUTE_TRIES + 1} files from "
                f"{self.dataset.path(unusable[0])} on could be decoded ({self.dataset.skipped} unreadable so far); "
                "check that the folder holds valid images"
            )
        return batch

    def close(self) -> None:
        """Stop the worker processes (they persist across epochs until this, or until garbage collection)."""
        self._loader = None  # the DataLoader's iterator shuts its workers down when it is freed


def limit_dataset(dataset, limit: int | None, seed: int = 0):
    """A fixed random subset of ``limit`` samples (smoke runs and tests; the embedded set is
    stored class by class, so its first N samples would all be airplanes)."""
    if limit is None or limit >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return dataset.subset(keep, name=f"{dataset.name}[{limit} of {len(dataset)}]")


def make_loader(dataset: ImageArrayDataset | ImageStream, batch_size: int, *, workers: int | None = None,
                **kwargs: Any) -> BatchLoader:
    """The loader a source needs: StreamLoader for a streamed folder or shards, BatchLoader for data in memory.

    `kwargs` are the shared BatchLoader options (shuffle, seed, rank, world_size, drop_last, pin_memory).
    """
    if isinstance(dataset, ImageStream):
        return StreamLoader(dataset, batch_size, workers=workers, **kwargs)
    return BatchLoader(dataset, batch_size, **kwargs)
