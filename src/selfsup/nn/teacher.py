"""What every teacher-student method shares: the EMA teacher, its momentum and decay schedules,
the training clock that methods read inside ``forward``, the parameter freezer, and the DINO-style
teacher step and centre update. One module, so methods never import each other's helpers.

BYOL, MoCo v2/v3, DINO, DINOv2, I-JEPA and data2vec 2.0 build their teachers with ``make_teacher``
and move them with ``ema_update``; the schedules are the papers' own (cosine momentum for BYOL,
MoCo v3, DINO; linear for I-JEPA; data2vec's annealed decay).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from selfsup.losses import dino_center_update
from selfsup.nn.schedules import momentum_schedule

if TYPE_CHECKING:  # the contract sits a layer above; only its type is named here
    from selfsup.core.method import Progress


def make_teacher(student: nn.Module, *, no_drop_path: bool = False) -> nn.Module:
    """A frozen deep copy of ``student`` that only EMA updates touch; ``no_drop_path``: without
    stochastic depth (every ``drop_prob`` set to 0), as the official DINO, I-JEPA and data2vec 2.0
    teachers run."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if no_drop_path:
        for m in teacher.modules():
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameters and float buffers alike
    (integer buffers such as BN's num_batches_tracked are copied)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        if tb.dtype.is_floating_point:
            tb.lerp_(sb, 1.0 - momentum)
        else:
            tb.copy_(sb)


class EMA:
    """EMA with the cosine momentum schedule of BYOL: m goes from ``base`` to ``final``."""

    def __init__(self, base: float = 0.996, final: float = 1.0) -> None:
        self.base, self.final = base, final

    def momentum(self, step: int, total_steps: int) -> float:
        return momentum_schedule(step, total_steps, self.base, self.final)

    def update(self, teacher: nn.Module, student: nn.Module, step: int, total_steps: int) -> float:
        m = self.momentum(step, total_steps)
        ema_update(teacher, student, m)
        return m


def linear_momentum(step: int, total_steps: float, start: float = 0.996, end: float = 1.0) -> float:
    """I-JEPA's EMA momentum for update ``step`` (0-based): start + step (end - start) / total,
    the official generator's i-th value; held at ``end`` past the last step."""
    if total_steps <= 0:
        return end
    m = start + step * (end - start) / total_steps
    return min(m, end) if end >= start else max(m, end)


class LinearEMATarget:
    """What the joint-embedding predictive methods (I-JEPA, TS-JEPA) share about their target encoder,
    as a mixin before the method's modality base class: ``self.target_backbone`` follows
    ``self.backbone`` by EMA after every kept step, the momentum rising linearly from ``cfg.ema[0]`` to
    ``cfg.ema[1]`` over ``cfg.ipe_scale`` x the run (``linear_momentum``), and ``cfg.eval_encoder``
    (``context`` or ``target``; context where the config has no such option) picks the encoder that
    ``encode`` reads and ``selfsup export`` writes. A method that built no ``target_backbone`` (a
    configuration without one, such as ts_forecast's value target) has no teacher and no EMA step."""

    def export_backbone(self) -> nn.Module:
        return self.target_backbone if getattr(self.cfg, "eval_encoder", "context") == "target" else self.backbone

    def momentum(self, progress: Progress) -> float:
        """m for the update after optimizer step ``progress.step`` (update index step - 1)."""
        start, end = self.cfg.ema
        return linear_momentum(max(0, progress.step - 1), progress.total_steps * self.cfg.ipe_scale, start, end)

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        target = getattr(self, "target_backbone", None)
        return [] if target is None else [(target, self.backbone)]

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        super().on_step_end(progress)
        for target, online in self.teacher_pairs():
            ema_update(target, online, self.momentum(progress))


def check_linear_ema_target(cfg) -> None:
    """Refuse (ConfigError) a ``LinearEMATarget`` method's config whose ``ema`` is not 0 <= start <= end
    <= 1, whose ``ipe_scale`` is not positive or whose ``eval_encoder`` (where it has one) is neither
    context nor target."""
    from selfsup.errors import ConfigError

    lo, hi = cfg.ema
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"method.ema={cfg.ema}: needs 0 <= start <= end <= 1")
    if cfg.ipe_scale <= 0:
        raise ConfigError(f"method.ipe_scale={cfg.ipe_scale}: must be > 0")
    if getattr(cfg, "eval_encoder", "context") not in ("context", "target"):
        raise ConfigError(f"method.eval_encoder={cfg.eval_encoder!r}: must be context or target")


def check_annealed_decay(cfg) -> None:
    """Refuse (ConfigError) a method config whose ``ema_decay`` / ``ema_end_decay`` lie outside [0, 1] or
    whose ``ema_anneal_end_step`` is negative (the data2vec methods' schedule, ``annealed_decay``)."""
    from selfsup.errors import ConfigError

    for key in ("ema_decay", "ema_end_decay"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"method.{key}={getattr(cfg, key)}: must be in [0, 1]")
    if cfg.ema_anneal_end_step < 0:
        raise ConfigError(f"method.ema_anneal_end_step={cfg.ema_anneal_end_step}: must be >= 0")


class AnnealedBlockEMA:
    """What the data2vec methods on text and audio share about their teacher, as a mixin before the
    method's modality base class: after every kept step the teacher's transformer blocks
    (``self.teacher.model.blocks``) follow the student's by EMA at data2vec's annealed decay
    (``annealed_decay`` from ``cfg.ema_decay`` to ``cfg.ema_end_decay`` at ``cfg.ema_anneal_end_step``;
    none once it reaches 1), and ``self.ema_decay_now`` (a buffer the method registers) holds the decay
    for the logs."""

    def momentum(self, progress: Progress) -> float:
        """The decay for the update after optimizer step ``progress.step`` (official ``set_num_updates``)."""
        return annealed_decay(progress.step, self.cfg.ema_decay, self.cfg.ema_end_decay, self.cfg.ema_anneal_end_step)

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        super().on_step_end(progress)
        tau = self.momentum(progress)
        self.ema_decay_now.fill_(tau)
        if tau < 1.0:
            ema_update(self.teacher.model.blocks, self.backbone.model.blocks, tau)


def annealed_decay(step: int, start: float, end: float, anneal_end_step: int) -> float:
    """Official ``get_annealed_rate``: linear from ``start`` (step 0) to ``end`` at
    ``anneal_end_step``, then ``end``."""
    if step >= anneal_end_step:
        return end
    return end - (end - start) * (1.0 - step / anneal_end_step)


class TrainingClock(nn.Module):
    """Where training stands, readable inside ``forward``.

    The trainer reports progress only after each optimizer step (``on_step_end``), while SwAV's
    prototype freezing and queue start and DINO's teacher temperature and last-layer freezing
    depend on the epoch of the step being computed. The clock keeps the last report and saves it
    as a buffer, so a resumed run knows its epoch before its first step."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("state", torch.zeros(2, dtype=torch.long))  # steps done, steps per epoch
        self.step, self.steps_per_epoch = 0, 0
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync())

    def _sync(self) -> None:
        self.step, self.steps_per_epoch = (int(v) for v in self.state.tolist())

    def tick(self, progress: Progress) -> None:
        self.step, self.steps_per_epoch = progress.step, progress.steps_per_epoch
        self.state[0], self.state[1] = progress.step, progress.steps_per_epoch  # no host sync

    @property
    def epoch(self) -> int:
        """0-based epoch of the next step (0 before the first report)."""
        return self.step // self.steps_per_epoch if self.steps_per_epoch else 0

    def within(self, epochs: float) -> bool:
        """Whether the next step falls in the first ``epochs`` epochs (fractions allowed)."""
        if epochs <= 0:
            return False
        return not self.steps_per_epoch or self.step < epochs * self.steps_per_epoch


class ParamFreezer:
    """Keeps ``params`` fixed while ``active()``: a hook zeroes their gradients (so DDP all-reduces
    zeros, gradient clipping ignores them and adaptive optimizers keep zero moments), and the
    values saved by ``before_step`` are written back by ``after_step``, undoing what weight
    decay or momentum did. Register it after any deep copy of the module (hooks are not copied)."""

    def __init__(self, params: Iterable[nn.Parameter], active: Callable[[], bool]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.active = active
        self._saved: list[torch.Tensor] | None = None
        for p in self.params:
            p.register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if self.active() else grad

    @torch.no_grad()
    def before_step(self) -> None:
        if self.active() and self._saved is None:
            self._saved = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after_step(self) -> bool:
        """Write the saved values back; True when the parameters were frozen in this step."""
        if self._saved is None:
            return False
        for p, saved in zip(self.params, self._saved):
            p.copy_(saved)
        self._saved = None
        return True


def teacher_step(method: Any, progress: Progress, pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    """After each optimizer step of DINO and DINOv2, once ``Method.on_step_end`` ran the deferred
    centre updates: release the last layer once its frozen steps are over (``method.freezer``),
    move every teacher towards its student with the momentum of this step (``method.momentum``),
    then advance the clock that the temperature and centre schedules read (``method.clock``)."""
    method.freezer.after_step()
    m = method.momentum(progress)
    for teacher, student in pairs:
        ema_update(teacher, student, m)
    method.clock.tick(progress)


def defer_center(method: Any, center: torch.Tensor, teacher, momentum: float) -> None:
    """Move ``center`` towards the teacher's global-batch mean after the step (DINO eq. 4,
    c <- m c + (1 - m) mean). The mean is reduced across ranks here, in ``forward``, where every
    rank runs the same collectives; the buffer changes only in ``on_step_end``, for a kept step."""
    batch_mean = dino_center_update(torch.zeros_like(center), teacher, momentum=0.0).float()
    method.defer(lambda: center.copy_((center.float() * momentum + batch_mean * (1.0 - momentum)).to(center.dtype)))
