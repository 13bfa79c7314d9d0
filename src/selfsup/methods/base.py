"""The Method contract: everything an SSL method needs beyond its backbone lives in its file.

A Method is an ``nn.Module`` with
- ``forward(batch) -> StepOutput``: one training step's loss (plus metrics to log, and the
  embeddings the collapse monitor watches) from a raw batch (uint8 images, token ids, ...);
  the method makes its own views/masks on the batch's device;
- ``encode(x) -> features``: what downstream evaluation uses, from a preprocessed input;
- ``embed(batch) -> features``: raw eval batch -> features (preprocessing + ``encode``), used by
  kNN / linear probe / export so the evaluation code never knows the modality;
- ``on_step_end(progress)``: after each optimizer step (EMA teachers, queues, schedules);
- ``prepare(dataset, run_dir)``: once before training, after a resume's state is loaded (BEiT
  fits its tokenizer here).
The trainer never knows which method it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from selfsup.errors import ConfigError
from selfsup.pretext.augment import Augment, eval_transform


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None  # (n, d) of one view, for the collapse monitor


@dataclass
class Progress:
    """Where training stands, handed to schedules inside methods (EMA momentum, temperatures)."""

    step: int  # optimizer steps done
    total_steps: int
    epoch: int  # current epoch (0-based)
    epochs: int
    steps_per_epoch: int

    @property
    def frac(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))


@dataclass
class MethodConfig:
    """Base for each method's hyperparameters; ``name`` picks the method from the registry."""

    name: str = ""
    min_batch_size: ClassVar[int] = 1

    def validate(self) -> None:
        """Methods override to reject out-of-range values (raise ConfigError)."""


class Method(nn.Module):
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # "Authors Year, Title" for `selfsup methods`
    family: ClassVar[str] = ""  # contrastive | distillation | clustering | redundancy | masked | pretext
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    Config: ClassVar[type] = MethodConfig

    def __init__(self, cfg: Any, backbone: nn.Module, augment: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.views = nn.ModuleList(Augment(v) for v in augment.views)
        self.local_views = nn.ModuleList(Augment(augment.local) for _ in range(augment.n_local))
        self.channels_last = False  # set by the trainer
        first = augment.views[0]
        self.eval_size, self.eval_mean, self.eval_std = first.size, first.mean, first.std

    def require_two_views(self, no_local: bool = False) -> None:
        """Refuse an augment config that does not give the two views (and, with ``no_local``, no
        local crops) that two-view methods train on."""
        if len(self.views) != 2 or (no_local and len(self.local_views)):
            local = f", augment.n_local={len(self.local_views)}" if no_local else ""
            raise ConfigError(f"{self.name} trains on exactly 2 views{' and no local crops' if no_local else ''}; "
                              f"augment.views has {len(self.views)}{local}")

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def export_backbone(self) -> nn.Module:
        """The backbone ``selfsup export`` writes: the one ``encode`` reads."""
        return self.backbone

    def export_note(self) -> str:
        """What a user of the exported backbone needs to reproduce ``encode`` beyond running it on the
        image ('' when that is all ``encode`` does); ``selfsup export`` prints it and stores it."""
        return ""

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """Put an image batch in the memory format the trainer chose (channels_last is ~1.5-3x
        faster for convnets on CPU with bf16 and on tensor-core GPUs)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def preprocess(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.layout(eval_transform(batch["images"], self.eval_size, self.eval_mean, self.eval_std))

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(self.preprocess(batch)).float()

    def on_step_end(self, progress: Progress) -> None:
        """Hook after each optimizer step; most methods need nothing."""

    def prepare(self, dataset: Any, run_dir: Any = None) -> None:
        """Hook before the first step, after a resumed run's state is loaded: methods that fit
        something on the training data (BEiT's tokenizer) do it here; most need nothing."""

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """All global views then all local views of a uint8 batch, made on its device."""
        return [self.layout(v(images)) for v in (*self.views, *self.local_views)]
