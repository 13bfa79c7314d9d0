"""Per-step schedules: linear warmup then half-cosine, as in SimCLR, BYOL, DINO and MAE; warmup, constant, linear
cooldown (V-JEPA 2's pretraining then cooldown, the "WSD" schedule)."""

from __future__ import annotations

import math


def cosine_schedule(step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> float:
    """Value at ``step`` (0-based): linear from ``warmup_start`` to ``base`` over ``warmup_steps``,
    then ``final + (base - final) * (1 + cos(pi * t)) / 2`` with t going 0 -> 1 over the rest."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    rest = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / rest)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def momentum_schedule(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's EMA momentum: tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2, rising to ``final``."""
    return cosine_schedule(step, total_steps, base, final)


def wsd_schedule(step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0,
                 warmup_start: float = 0.0, cooldown_steps: int = 0) -> float:
    """Warmup-stable-decay at ``step`` (0-based): linear from ``warmup_start`` to ``base`` over ``warmup_steps``,
    ``base`` until the last ``cooldown_steps`` steps, then linear from ``base`` to ``final`` over them (V-JEPA 2:
    warmup then a constant lr for pretraining, a linear decay in the cooldown)."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    start = total_steps - cooldown_steps
    if cooldown_steps <= 0 or step < start:
        return base
    return base + (final - base) * min(1.0, (step - start) / cooldown_steps)
