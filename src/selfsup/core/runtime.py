"""The runtime every entry point shares: the process group, the device, the precision, the
per-step seeds and the versions a run records."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import torch.distributed as tdist

from selfsup import __version__, dist
from selfsup.errors import ConfigError


def init_distributed(device_pref: str) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or tdist.is_initialized():
        return
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend="nccl" if use_cuda else "gloo")


def resolve_device(pref: str) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={pref!r} but CUDA is not available; use trainer.device=cpu")
        if pref == "cuda" and dist.is_dist():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        device = torch.device(pref)
    except RuntimeError:  # torch lists twenty device types; ours are few
        raise ConfigError(f"device {pref!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {pref!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return device


def cpu_has_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(pref: str, device: torch.device) -> str:
    if pref != "auto":
        if pref == "16-mixed" and device.type == "cpu":
            raise ConfigError("trainer.precision=16-mixed needs a GPU; use bf16-mixed or 32 on CPU")
        return pref
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32"


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A distinct, reproducible RNG seed for every (step, micro-batch, rank): resuming at any
    step replays exactly the augmentations an uninterrupted run would have drawn."""
    x = (seed * 1_000_003 + step) * 1_009 + micro
    return (x * 65_537 + rank) % (2**63 - 1)


def versions() -> dict[str, str]:
    import torchvision

    return {"selfsup": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version(), "platform": platform.platform()}
