"""The Method contract: everything an SSL method needs beyond its backbone lives in its file.

A Method is an ``nn.Module`` with
- ``forward(batch) -> StepOutput``: one training step's loss (plus metrics to log, and the
  embeddings the collapse monitor watches) from a raw batch (uint8 images, token ids, ...);
  the method makes its own views/masks on the batch's device;
- ``encode(x) -> features``: what downstream evaluation uses, from a preprocessed input;
- ``embed(batch) -> features``: raw eval batch -> features (preprocessing + ``encode``), used by
  kNN / linear probe / export so the evaluation code never knows the modality;
- ``on_step_end(progress)``: after each optimizer step the trainer keeps (EMA teachers, queues,
  centres, schedules). A method changes its own state only there: what ``forward`` computes for a
  later update (keys to enqueue, a teacher mean for the centre) it hands to ``defer``, and a step
  the trainer drops (non-finite loss) is forgotten by ``discard_step``, so it leaves no trace;
- ``prepare(dataset, run_dir)``: once before training, after a resume's state is loaded (BEiT
  fits its tokenizer here).
The trainer never knows which method it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from selfsup.errors import ConfigError
from selfsup.pretext.augment import Augment, eval_transform


@dataclass
class StepOutput:
    """What a method's ``forward`` returns; unpacks as ``loss, metrics = model(batch)``."""

    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None  # (n, d) of one view, for the collapse monitor

    def __iter__(self):
        return iter((self.loss, self.metrics))


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
    # multi-crop: whether the method trains on augment.local crops; the config refuses n_local > 0 otherwise
    uses_local_crops: ClassVar[bool] = False
    # optimizer hint: submodules trained at the constant base lr, off the lr schedule (SimSiam's predictor)
    fixed_lr_modules: ClassVar[tuple[str, ...]] = ()
    # trains on one view of each image, augment.views[0] (MAE, BEiT, data2vec 2.0, rotation): make_views
    # makes only that one, and any further views in the config are ignored
    single_view: ClassVar[bool] = False

    def __init__(self, cfg: Any, backbone: nn.Module, augment: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.views = nn.ModuleList(Augment(v) for v in augment.views)
        self.local_views = nn.ModuleList(Augment(augment.local) for _ in range(augment.n_local))
        self.channels_last = False  # set by the trainer
        self._deferred: list[Callable[[], None]] = []  # state updates of this step, run by on_step_end
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

    @property
    def encoder(self) -> nn.Module:
        """The module ``encode`` reads and ``selfsup export`` writes (I-JEPA: its EMA target by default)."""
        return self.export_backbone()

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, student) module pairs of the method's EMA teachers; ``init_from`` starts each
        teacher as a copy of its student again, as at construction. Methods with teachers declare them."""
        return []

    @torch.no_grad()
    def init_from(self, source: Any) -> dict:
        """Start from another run's encoder (the base of multi-stage pretraining, ``--init``).

        ``source``: a run directory, a ``.ckpt`` (its encoder: what its ``encode`` read) or a
        ``.safetensors`` file from ``selfsup export``. The weights go into ``self.backbone``, the
        one training updates, and every EMA teacher restarts as a copy of its student. Keys are
        matched by name; what is missing, unexpected or of another shape is counted in the returned
        report (never silently dropped: the caller prints it), and a source of which nothing fits
        is an error."""
        from selfsup.train.checkpoint import encoder_state, fit_report

        state, where = encoder_state(source)
        target = self.backbone.model
        own = target.state_dict()
        fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        report = fit_report(own, state, where)
        if not fits:
            from selfsup.errors import CheckpointError

            raise CheckpointError(f"nothing in {where} fits this backbone ({report['summary']}); "
                                  "was it trained with another backbone.name?")
        target.load_state_dict(fits, strict=False)
        for teacher, student in self.teacher_pairs():
            teacher.load_state_dict(student.state_dict())
        return report

    def export_note(self) -> str:
        """What a user of the exported backbone needs to reproduce ``encode`` beyond running it on the
        image ('' when that is all ``encode`` does); ``selfsup export`` prints it and stores it."""
        return ""

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """Put an image batch in the memory format the trainer chose (channels_last is ~1.5-3x
        faster for convnets on CPU with bf16 and on tensor-core GPUs)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def preprocess(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalized eval inputs (B, 3, eval_size, eval_size) of a raw batch (``eval_transform``).

        A padded batch (with ``image_sizes``) is prepared image by image from each image's own
        pixels; streamed evaluation sources send images already at the eval size, unpadded."""
        images, sizes = view_inputs(batch)
        if sizes is None:
            x = eval_transform(images, self.eval_size, self.eval_mean, self.eval_std)
        else:
            x = torch.cat([eval_transform(image[None, :, :h, :w], self.eval_size, self.eval_mean, self.eval_std)
                           for image, (h, w) in zip(images, sizes.tolist())])
        return self.layout(x)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(self.preprocess(batch)).float()

    def defer(self, update: Callable[[], None]) -> None:
        """Run ``update`` (a state change computed in ``forward``: a queue push, a centre move) in
        ``on_step_end``, after the optimizer step and only if the trainer keeps the step. Queued
        only in train mode, so a forward in eval mode changes nothing. Under gradient
        accumulation each micro-batch's updates run in order."""
        if self.training:
            self._deferred.append(update)

    def discard_step(self) -> None:
        """The trainer dropped this step (non-finite loss): forget the updates ``forward`` deferred."""
        self._deferred.clear()

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        """Hook after each optimizer step the trainer keeps: runs the updates ``forward`` deferred.
        Methods that override it call ``super().on_step_end(progress)`` first."""
        updates, self._deferred = self._deferred, []
        for update in updates:
            update()

    def prepare(self, dataset: Any, run_dir: Any = None) -> None:
        """Hook before the first step, after a resumed run's state is loaded: methods that fit
        something on the training data (BEiT's tokenizer) do it here; most need nothing."""

    def make_views(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """All global views then all local views of a batch, made on its device (only the first view
        for ``single_view`` methods).

        ``batch`` is the loader's dict: uint8 ``images`` and, when it holds images of different sizes
        padded to one canvas, ``image_sizes`` (B, 2), so that every crop is drawn inside its own image.
        A bare uint8 image tensor is taken as ``{"images": tensor}``."""
        images, sizes = view_inputs(batch)
        augments = self.views[:1] if self.single_view else (*self.views, *self.local_views)
        if sizes is None:  # one size: any view module taking just the images will do
            return [self.layout(v(images)) for v in augments]
        return [self.layout(v(images, image_sizes=sizes)) for v in augments]


def view_inputs(batch: dict[str, torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uint8 images, per-image sizes or None) of a batch dict, or of a bare image tensor."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch["images"], batch.get("image_sizes")
