"""The Method contract: everything an SSL method needs beyond its backbone lives in its file.

A Method is an ``nn.Module`` with
- ``forward(batch) -> StepOutput``: one training step's loss (plus metrics to log, and the
  embeddings the collapse monitor watches) from a raw batch (uint8 images, token ids, ...);
  the method makes its own views/masks on the batch's device;
- ``encode(x) -> features``: what downstream evaluation uses, from a preprocessed input;
- ``embed(batch) -> features``: raw eval batch -> features (``preprocess`` + ``encode``), used by
  kNN / linear probe / export so the evaluation code never knows the modality;
- ``modalities``: the modalities it accepts (see ``selfsup.modalities``). The base class knows
  none: the views of each modality (image crops, multi-crop, channels_last) live on that
  modality's side, e.g. ``selfsup.modalities.image.ImageMethod``, which every image method subclasses;
- ``on_step_end(progress)``: after each optimizer step the trainer keeps (EMA teachers, queues,
  centres, schedules). A method changes its own state only there: what ``forward`` computes for a
  later update (keys to enqueue, a teacher mean for the centre) it hands to ``defer``, and a step
  the trainer drops (non-finite loss) is forgotten by ``discard_step``, so it leaves no trace;
- ``prepare(dataset, run_dir)``: once before training, after a resume's state is loaded (BEiT
  fits its tokenizer here);
- ``figures``: the method-specific pictures ``selfsup report`` draws for it, each with the
  method that computes it (``prototype_scores``, ``reconstruct``).
The trainer never knows which method it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn


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
    modalities: ClassVar[tuple[str, ...]] = ()  # what it trains on; each modality's base class sets it
    Config: ClassVar[type] = MethodConfig
    # multi-crop: whether the method trains on augment.local crops; the config refuses n_local > 0 otherwise
    uses_local_crops: ClassVar[bool] = False
    # optimizer hint: submodules trained at the constant base lr, off the lr schedule (SimSiam's predictor)
    fixed_lr_modules: ClassVar[tuple[str, ...]] = ()
    # trains on one view of each sample, augment.views[0] (MAE, BEiT, data2vec 2.0, rotation): make_views
    # makes only that one, and any further views in the config are ignored
    single_view: ClassVar[bool] = False
    # whether the trainer put the inputs in channels_last (use_channels_last); False for non-image methods
    channels_last: bool = False
    # report figures beyond the common ones this method offers: 'prototypes' (then it implements
    # prototype_scores), 'reconstruction' (then it implements reconstruct)
    figures: ClassVar[tuple[str, ...]] = ()
    # what throughput counts (logs, progress bar, summary's <unit>_per_second): images, tokens, ...
    unit: ClassVar[str] = "images"
    # the side evaluation inputs are prepared at (image methods set it from their first view); part of
    # the feature cache's key, None where inputs have no size (token ids)
    eval_size: int | None = None

    def __init__(self, cfg: Any, backbone: nn.Module, augment: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self._deferred: list[Callable[[], None]] = []  # state updates of this step, run by on_step_end

    @property
    def modality(self) -> str:
        """The modality this instance trains on: its only one (a method of several, such as the two-view
        methods on images or series, says which its encoder chose)."""
        return self.modalities[0]

    def use_channels_last(self, enabled: bool) -> bool:
        """Whether the method takes the trainer's channels_last choice (4-D image inputs do, others do not)."""
        return False

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
        from selfsup.checkpoint import encoder_state, fit_report

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

    def preprocess(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``encode`` input of a raw evaluation batch; each modality's base class defines it."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to prepare a batch for encode")

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(self.preprocess(batch)).float()

    def embed_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, D) token features of a raw evaluation batch, for the attentive probe (``selfsup eval
        attentive``); modalities whose encoders keep tokens define it."""
        from selfsup.errors import ConfigError

        raise ConfigError(f"{self.name} does not hand out token features; the attentive probe reads the tokens of "
                          "video encoders")

    def prototype_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, K) scores of (N, D) backbone features (as ``embed`` returns them) against the method's K
        prototypes, for the report's prototype-usage figure. Methods declaring the "prototypes"
        figure implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no prototypes (it does not declare the "
                                  "'prototypes' figure)")

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked inputs, reconstructions) of ``x``, normalized eval inputs as ``preprocess``
        returns them; both in the same normalized space and shape as ``x``, for the report's
        reconstruction figure. Methods declaring the "reconstruction" figure implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct its inputs (it does not "
                                  "declare the 'reconstruction' figure)")

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

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """How many ``unit`` a training batch holds (its samples; text methods count tokens)."""
        return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])

    def prepare(self, dataset: Any, run_dir: Any = None) -> None:
        """Hook before the first step, after a resumed run's state is loaded: methods that fit
        something on the training data (BEiT's tokenizer) do it here; most need nothing."""
