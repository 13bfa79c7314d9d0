"""The image modality: batches of uint8 ``images`` (padded, with ``image_sizes``, when their sizes
differ), read from the built-in datasets, image folders (in memory or streamed) and shards
(``selfsup.data``), viewed by the batched augmentation of ``selfsup.pretext.augment`` (global and
local crops, on the training device), encoded by the ResNets, ViTs and timm models of
``selfsup.backbones``.

:class:`ImageMethod` is the base class of every image method: what ``Method`` leaves to each
modality (the views, multi-crop, the channels_last layout, evaluation preprocessing) is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from selfsup.core.method import Method
from selfsup.errors import ConfigError
from selfsup.pretext.augment import Augment, eval_transform
from selfsup.registry import Modality, check_batch, register_modality

BATCH_KEY = "images"


class ImageMethod(Method):
    """A Method on images: ``augment.views`` (global crops) and ``augment.local`` x ``n_local``
    (multi-crop) become ``Augment`` modules, run on the batch's device by ``make_views``;
    ``preprocess`` is the evaluation transform of the first view (resize, centre crop, normalize)."""

    modalities: ClassVar[tuple[str, ...]] = ("image",)

    def __init__(self, cfg: Any, backbone: nn.Module, augment: Any) -> None:
        super().__init__(cfg, backbone, augment)
        self.views = nn.ModuleList(Augment(v) for v in augment.views)
        self.local_views = nn.ModuleList(Augment(augment.local) for _ in range(augment.n_local))
        first = augment.views[0]
        self.eval_size, self.eval_mean, self.eval_std = first.size, first.mean, first.std

    def use_channels_last(self, enabled: bool) -> bool:
        self.channels_last = enabled
        return enabled

    def require_two_views(self, no_local: bool = False) -> None:
        """Refuse an augment config that does not give the two views (and, with ``no_local``, no
        local crops) that two-view methods train on."""
        if len(self.views) != 2 or (no_local and len(self.local_views)):
            local = f", augment.n_local={len(self.local_views)}" if no_local else ""
            raise ConfigError(f"{self.name} trains on exactly 2 views{' and no local crops' if no_local else ''}; "
                              f"augment.views has {len(self.views)}{local}")

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """Put an image batch in the memory format the trainer chose (channels_last is ~1.5-3x
        faster for convnets on CPU with bf16 and on tensor-core GPUs)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def preprocess(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalized eval inputs (B, 3, eval_size, eval_size) of a raw batch (``eval_transform``).

        A padded batch (with ``image_sizes``) is prepared image by image from each image's own
        pixels; streamed evaluation sources send images already at the eval size, unpadded."""
        images, sizes = self.view_inputs(batch)
        if sizes is None:
            x = eval_transform(images, self.eval_size, self.eval_mean, self.eval_std)
        else:
            x = torch.cat([eval_transform(image[None, :, :h, :w], self.eval_size, self.eval_mean, self.eval_std)
                           for image, (h, w) in zip(images, sizes.tolist())])
        return self.layout(x)

    def make_views(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """All global views then all local views of a batch, made on its device (only the first view
        for ``single_view`` methods).

        ``batch`` is the loader's dict: uint8 ``images`` and, when it holds images of different sizes
        padded to one canvas, ``image_sizes`` (B, 2), so that every crop is drawn inside its own image.
        A bare uint8 image tensor is taken as ``{"images": tensor}``."""
        images, sizes = self.view_inputs(batch)
        augments = self.views[:1] if self.single_view else (*self.views, *self.local_views)
        if sizes is None:  # one size: any view module taking just the images will do
            return [self.layout(v(images)) for v in augments]
        return [self.layout(v(images, image_sizes=sizes)) for v in augments]

    def view_inputs(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(uint8 images, per-image sizes or None) of a batch dict or a bare image tensor; a batch of
        another modality is a one-line ConfigError."""
        if isinstance(batch, torch.Tensor):
            return batch, None
        if BATCH_KEY not in batch:
            check_batch(self.name, self.modalities, batch)
        return batch[BATCH_KEY], batch.get("image_sizes")


def _claims(source: str) -> bool:
    """Built-in image datasets, and folders (image folders, shard sets). A folder of text files is also
    the text reader's; a method's own modality wins (``registry.modality_of_source``), and a stray
    ``labels.txt`` beside the images does not take an image folder away from image methods."""
    from selfsup.data.datasets import DATASET_NAMES

    return source.strip().lower() in DATASET_NAMES or Path(source).expanduser().is_dir()


def _open(cfg: Any, split: str, evaluation: bool = False) -> Any:
    """``data.mode``'s choice of memory, stream or shards for split ``split`` (see data/modes.py); for
    evaluation a streamed split's images come prepared at the first view's size."""
    from selfsup.data.modes import open_data

    data = cfg.data
    return open_data(data.source, split, mode=data.mode, root=data.root, decode_size=data.decode_size,
                     download=data.download, max_side=data.max_side,
                     eval_size=cfg.augment.views[0].size if evaluation else None,
                     memory_budget_gib=data.memory_budget_gib)


IMAGE = register_modality(Modality("image", (BATCH_KEY, "image_sizes"), _claims, _open,
                                   "uint8 images (B, 3, H, W); built-in sets, image folders, shards"))

__all__ = ["IMAGE", "ImageMethod"]
