"""Batches from an in-memory ImageArrayDataset, without torch.utils.data.DataLoader.

The images already sit in one uint8 tensor, so a batch is a single
`index_select`; collating thousands of per-item tuples through DataLoader
workers would be far slower and harder to make exactly resumable.
The order depends only on (seed, epoch), so every rank computes the same
permutation and a run can resume mid-epoch at an exact batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from selfsup.data.datasets import ImageArrayDataset
from selfsup.errors import DataError

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
    """Iterate an ImageArrayDataset in batches of dicts {"images", "labels", "index"}.

    With shuffle=True each epoch uses a permutation seeded by (seed, epoch),
    identical on all ranks and truncated so every rank gets the same number of
    samples; rank r takes positions r::world_size. With shuffle=False the order
    is 0..N-1 (evaluation), and drop_last=False keeps the last partial batch.
    """

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
            order = torch.randperm(count, generator=generator)
        else:
            order = torch.arange(count)
        usable = self.samples_per_rank * self.world_size
        return order[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start, self._start_batch = self._start_batch, 0
        order = self.indices()
        for batch in range(start, len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self._gather(index)

    def _gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Build one batch by indexing the in-memory tensors."""
        images = self.dataset.images.index_select(0, index)
        labels = self.dataset.labels.index_select(0, index)
        if self.pin_memory:
            images, labels, index = images.pin_memory(), labels.pin_memory(), index.pin_memory()
        return {"images": images, "labels": labels, "index": index}
