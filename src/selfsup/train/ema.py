"""Exponential moving average of a module's weights, for teacher networks (BYOL, MoCo, DINO)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from selfsup.train.schedules import momentum_schedule


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` that only EMA updates touch."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
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
