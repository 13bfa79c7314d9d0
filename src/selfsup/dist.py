"""The one place that knows about ranks. Methods call `gather` when a loss needs the whole
global batch; everything else is PyTorch's own DDP, set up by the trainer from torchrun's
environment variables."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient for a slice back to its owner.

    Forward: each rank gets the concatenation of all ranks' tensors. Backward: the gradient of
    the concatenation is summed over ranks (all_reduce) and each rank keeps its own slice, so a
    loss on gathered negatives trains the encoders that produced them (SimCLR sec. 2.2)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.batch = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather(x: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (equal shapes required). With one process it
    returns ``x`` itself. ``grad=False`` for targets that need no gradient (queues, teachers)."""
    if not is_dist() or world_size() == 1:
        return x
    if grad and x.requires_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return x


def all_reduce_sum(x: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Sum of ``x`` over ranks (``x`` itself with one process). ``grad=True`` makes the sum part
    of the autograd graph (PyTorch's ``torch.distributed.nn.functional.all_reduce``, whose
    backward is again a sum over ranks): for losses of a statistic summed over the global batch,
    e.g. Barlow Twins' cross-correlation."""
    if not is_dist() or world_size() == 1:
        return x
    if grad and x.requires_grad:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x)
    x = x.clone()
    dist.all_reduce(x)
    return x
