"""Float32 inside every loss, whatever autocast is on outside.

Autocast runs matrix products in bf16 / fp16 even on float32 inputs: a logit ``q . k / tau`` at
tau = 0.1 then carries the bf16 rounding of the cosine (~4e-3) times 10, and the gradient of an
NT-Xent at batch 256 moves by ~2%. Softmaxes over tens of thousands of outputs, Sinkhorn's
``exp(s / 0.05)`` and sums of thousands of squared errors lose as much. So every loss turns
autocast off and computes on float32 copies of its floating inputs; the network that produced
them keeps its lower precision, and gradients flow back through the casts in its dtype.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

Fn = TypeVar("Fn", bound=Callable[..., Any])


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``x``'s device (a no-op context where that device has no autocast,
    e.g. ``meta``)."""
    if not torch.amp.is_autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def _to_fp32(arg: Any) -> Any:
    """Floating tensors (alone or in a list / tuple) as float32; anything else unchanged."""
    if torch.is_tensor(arg):
        return arg.float() if arg.is_floating_point() else arg
    if isinstance(arg, (list, tuple)) and any(torch.is_tensor(a) for a in arg):
        return [_to_fp32(a) for a in arg]
    return arg


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for arg in (*args, *kwargs.values()):
        if torch.is_tensor(arg):
            return arg
        if isinstance(arg, (list, tuple)):
            found = next((a for a in arg if torch.is_tensor(a)), None)
            if found is not None:
                return found
    return None


def fp32_loss(fn: Fn) -> Fn:
    """Decorator: call ``fn`` with autocast off and every floating tensor argument (also inside
    lists and tuples) cast to float32, so its products, softmaxes and reductions run in float32.
    Integer and bool tensors (labels, masks) pass unchanged; a float32 input is passed as is, so
    its gradient is exact."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ref = _first_tensor(args, kwargs)
        if ref is None:
            return fn(*args, **kwargs)
        with autocast_off(ref):
            return fn(*[_to_fp32(a) for a in args], **{k: _to_fp32(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
