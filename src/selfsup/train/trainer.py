"""The training loop: device, precision, distributed, schedules, checkpoints, logs.

Distributed runs use plain ``torch.distributed`` + DDP, started by ``torchrun`` (we read its
RANK / WORLD_SIZE / LOCAL_RANK variables). We chose it over Lightning Fabric because the loop
is short, exact resume and atomic checkpoints need control over every byte we save, and it
keeps the dependency list to PyTorch itself; a one-process CPU run and a multi-GPU run go
through the same code.

The trainer never knows which method it runs: it calls ``method(batch) -> StepOutput`` and
``method.on_step_end(progress)``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import platform
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from selfsup import __version__, dist
from selfsup.config import Config, dump_config
from selfsup.errors import ConfigError, TrainingError
from selfsup.methods.base import Method, Progress
from selfsup.train.checkpoint import (explain_disk_full, load_weights, remove_stale_temp_files, save_atomic,
                                      write_text_atomic)
from selfsup.train.monitor import CollapseMonitor
from selfsup.train.optim import build_optimizer
from selfsup.train.schedules import cosine_schedule

log = logging.getLogger("selfsup")


# --------------------------------------------------------------------------------------
# environment


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


# --------------------------------------------------------------------------------------
# building blocks shared with eval and export


def build_method(cfg: Config) -> Method:
    from selfsup.backbones import build_backbone
    from selfsup.registry import get_method

    method_cls = get_method(cfg.method.name)
    torch.manual_seed(cfg.trainer.seed)  # same seed -> same init, also for the random-init baseline
    backbone_cfg = cfg.backbone
    if backbone_cfg.img_size is None and backbone_cfg.name.startswith(("timm:", "vit_")):
        backbone_cfg = replace(backbone_cfg, img_size=cfg.augment.views[0].size)  # ViTs: the global crop side
    return method_cls(cfg.method, build_backbone(backbone_cfg), cfg.augment)


def limit_dataset(dataset, limit: int | None, seed: int = 0):
    """A fixed random subset of ``limit`` samples (smoke runs and tests; the embedded set is
    stored class by class, so its first N samples would all be airplanes)."""
    if limit is None or limit >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return dataset.subset(keep, name=f"{dataset.name}[{limit} of {len(dataset)}]")


def open_training_data(cfg: Config, data=None) -> tuple[Any, str, str]:
    """(source, mode, one-line note) of the training split: read by the reader of the source's
    modality (selfsup.modalities; for images ``data.mode``'s choice, data/modes.py). ``data``, a
    source built by the caller, is used as given."""
    from selfsup.data.shards import ShardStream
    from selfsup.data.sources import FolderStream
    from selfsup.data.user import BatchIterable, SampleSource
    from selfsup.modalities import check_source, get_modality, modality_of_source
    from selfsup.registry import get_method

    if data is not None:
        kinds = ((FolderStream, "stream"), (ShardStream, "shards"), (SampleSource, "dataset"),
                 (BatchIterable, "iterable"))
        mode = next((name for kind, name in kinds if isinstance(data, kind)), "memory")
        what = {"dataset": "a Dataset of samples given to the Trainer, read by the loader workers",
                "iterable": "an iterable of batches given to the Trainer, read as it comes"}
        return data, mode, f"{mode} ({what.get(mode, 'a source given to the Trainer')})"
    method = get_method(cfg.method.name)
    check_source(method.name, method.modalities, cfg.data.source)
    modality = modality_of_source(cfg.data.source, method.modalities) or method.modalities[0]
    opened = get_modality(modality).open(cfg.data, cfg.data.train_split)
    return opened.dataset, opened.mode, opened.note


class DataWait:
    """The share of step time spent waiting for the next batch (``data_wait``).

    The first WARMUP steps of a session are left out (workers starting, caches filling). When at
    least SETTLE steps have been measured and the share so far is above THRESHOLD, ``advice``
    returns one line, once per session, saying the loader is the bottleneck and what to change."""

    WARMUP, SETTLE, THRESHOLD = 3, 10, 0.10

    def __init__(self) -> None:
        self.steps, self.wait, self.total = 0, 0.0, 0.0
        self.warned = False

    def add(self, wait_s: float, step_s: float) -> None:
        """One step: ``wait_s`` waiting for its batches, ``step_s`` in the step itself."""
        self.steps += 1
        if self.steps > self.WARMUP:
            self.wait += wait_s
            self.total += wait_s + step_s

    @property
    def share(self) -> float | None:
        """Waiting / (waiting + stepping) over the steps after the warm-up; None before any."""
        return self.wait / self.total if self.total > 0 else None

    def advice(self, mode: str, workers: int) -> str | None:
        """The bottleneck line the first time it applies (see the class docstring), else None."""
        share = self.share
        if self.warned or share is None or self.steps < self.WARMUP + self.SETTLE or share <= self.THRESHOLD:
            return None
        self.warned = True
        if mode != "memory":
            fix = f"raise data.workers (now {workers}), or use data.mode=memory if the decoded set fits in RAM"
        else:
            fix = "the batches come from memory, so check for other processes on these cores (trainer.threads)"
        return f"the data loader is the bottleneck: {share:.0%} of each step waits for data; {fix}"


# what a run writes into its folder: a folder holding any of these holds a run
_RUN_FILES = ("last.ckpt", "config.yaml", "metrics.csv", "summary.json")


def make_run_dir(cfg: Config, run_dir: str | Path | None = None) -> Path:
    """Create the folder of a new run and return it: ``run_dir``, else
    ``trainer.out_dir/trainer.run_name``, else ``trainer.out_dir/<method>-<time>``.

    A named folder that already holds a run is refused (only a resume continues a run). A
    default name is taken with os.mkdir, which only one of two runs started in the same second
    wins; the other takes the next free suffix (-2, -3, ...). Rank 0 decides and every rank
    gets its answer, the folder or the error."""
    path, error = None, None
    if dist.rank() == 0:
        try:
            path = str(_claim_run_dir(cfg, run_dir))
        except ConfigError as err:
            error = str(err)
        except OSError as err:  # unwritable out_dir, a file in the way
            error = f"cannot create the run directory: {err}"
    if dist.is_dist():
        box = [path, error]
        tdist.broadcast_object_list(box, src=0)
        path, error = box
    if error is not None:
        raise ConfigError(error)
    return Path(path)


def refuse_held_run_dir(cfg: Config, run_dir: str | Path | None) -> None:
    """ConfigError when the run's named folder already holds a run (only a resume continues one)."""
    if run_dir is None and cfg.trainer.run_name is None:
        return  # a new default name is claimed when the run starts
    path = Path(run_dir) if run_dir is not None else Path(cfg.trainer.out_dir) / cfg.trainer.run_name
    held = [name for name in _RUN_FILES if (path / name).exists()] + [p.name for p in path.glob("*.ckpt")][:1]
    if held:
        raise ConfigError(f"{path} already holds a run ({', '.join(dict.fromkeys(held))}); continue it with "
                          f"`selfsup pretrain --resume {path}`, or choose another trainer.run_name")


@dataclass
class _TrainingData:
    """What ``Trainer.attach_data`` opened: the source, how, its loader, the step counts, the run folder."""

    dataset: Any
    mode: str
    note: str
    loader: Any
    steps_per_epoch: int
    total_steps: int
    run_dir: Path


def make_training_loader(dataset: Any, cfg: Config, per_rank: int, rank: int, world: int, *,
                         pin_memory: bool) -> Any:
    """The training loader of a source: shuffled from (seed, epoch), equal shares per rank, full
    batches; an iterable of batches (``selfsup.data.user.BatchIterable``) is its own loader."""
    from selfsup.data.loader import make_loader
    from selfsup.data.user import BatchIterable

    if isinstance(dataset, BatchIterable):
        return dataset.loader(cfg, per_rank)
    return make_loader(dataset, per_rank, workers=cfg.data.workers, shuffle=True, seed=cfg.trainer.seed, rank=rank,
                       world_size=world, drop_last=True, pin_memory=pin_memory)


def _claim_run_dir(cfg: Config, run_dir: str | Path | None) -> Path:
    if run_dir is None and cfg.trainer.run_name is None:
        base = Path(cfg.trainer.out_dir) / f"{cfg.method.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count(1):
            path = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                path.mkdir()  # atomic: exactly one process creates a given folder
                return path
            except FileExistsError:
                continue
    refuse_held_run_dir(cfg, run_dir)
    path = Path(run_dir) if run_dir is not None else Path(cfg.trainer.out_dir) / cfg.trainer.run_name
    path.mkdir(parents=True, exist_ok=True)
    return path


class NormStats:
    """The running statistics of every normalization layer (BatchNorm's running mean and variance,
    teachers' included), saved before each step so that a dropped step can put them back: a
    non-finite batch that reached BatchNorm in train mode has already written NaN into them, which
    would poison every later evaluation even though training goes on with batch statistics.
    A few hundred small tensors for a ResNet-50: one grouped copy per step."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.live: list[torch.Tensor] | None = None
        self.saved: list[torch.Tensor] = []

    def save(self) -> None:
        if self.live is None:  # at the first step, after the trainer moved the model to its device
            self.live = [b for m in self.module.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                         for b in m.buffers()]
            self.saved = [b.clone() for b in self.live]
        elif self.live:
            torch._foreach_copy_(self.saved, self.live)

    @torch.no_grad()
    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.saved)


class _StopFlag:
    """First Ctrl-C (or SIGTERM from a scheduler) asks the loop to save and stop after the
    current step; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------------------
# the loop


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None, resume: dict | None = None,
                 data=None) -> None:
        self._t_session = time.perf_counter()  # this session's wall time counts from here (setup included)
        init_distributed(cfg.trainer.device)
        self.cfg = cfg
        self.device = resolve_device(cfg.trainer.device)
        self.precision = resolve_precision(cfg.trainer.precision, self.device)
        if cfg.trainer.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.trainer.threads)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0

        per_rank = cfg.data.batch_size // (self.world * cfg.trainer.accumulate)
        if per_rank * self.world * cfg.trainer.accumulate != cfg.data.batch_size or per_rank < 1:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} must divide evenly into {self.world} process(es) x "
                f"trainer.accumulate={cfg.trainer.accumulate} micro-batches"
            )
        self.micro_batch = per_rank
        self.method = build_method(cfg).to(self.device)
        self.init_report = None
        if cfg.backbone.init and resume is None:  # a resumed run has its own weights
            self.init_report = self.method.init_from(cfg.backbone.init)
        # channels_last where the method's inputs are 4-D images (ImageMethod takes it, others decline)
        wanted = cfg.trainer.channels_last and self.device.type in ("cpu", "cuda")
        self.channels_last = self.method.use_channels_last(wanted)
        if self.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.lr = cfg.optim.scaled_lr(cfg.data.batch_size)
        self.optimizer = build_optimizer(self.method, cfg.optim, self.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "16-mixed")
        self.monitor = CollapseMonitor(cfg.trainer.monitor_every)
        self._norm_stats = NormStats(self.method)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.bad_steps_total = 0
        # train_seconds: in optimizer steps, all segments. wall_seconds (in the trainer: setup, steps,
        # checkpoints) and segments: those of the earlier segments of a resumed run; this session's are
        # added when a checkpoint or the summary is written
        self.history: dict[str, Any] = {"train_seconds": 0.0, "images": 0, "wall_seconds": 0.0, "segments": 0}
        if resume is not None:
            self._load_state(resume)
        # a resume continues in its own folder; a new run's folder is checked now and claimed once the
        # data proved usable (attach_data), so that a start that fails leaves no empty folder
        self._continuing = resume is not None and run_dir is not None
        self._run_dir_arg = run_dir
        if not self._continuing:
            refuse_held_run_dir(cfg, run_dir)
        self.model = self.method
        self.data_wait = DataWait()
        self._data: _TrainingData | None = None
        if data is not None:
            self.attach_data(data)

    # ---- the data ------------------------------------------------------------------------

    def attach_data(self, data: Any = None) -> None:
        """Open the training data, once: ``data`` when given, else ``cfg.data.source`` through its
        modality's reader. ``data`` may be a selfsup source, a map-style Dataset of samples (dicts
        such as ``{"images": uint8 (3, H, W), "labels": int}``, or ``(image, label)`` pairs as
        torchvision datasets give), or any other iterable of batches (a DataLoader, an
        IterableDataset); see ``selfsup.data.user``. Then the run's folder is claimed and the
        method prepares on the data (BEiT's tokenizer). The properties below attach the
        configured data when read first; ``fit(data=...)`` attaches the given one."""
        if self._data is not None:
            raise ConfigError("this Trainer already has its training data; build a new Trainer for other data")
        from selfsup.data.user import adapt_training_data

        cfg = self.cfg
        dataset, mode, note = open_training_data(cfg, adapt_training_data(data, cfg, self.method))
        if cfg.data.limit is not None and hasattr(dataset, "subset") and cfg.data.limit < len(dataset):
            dataset = limit_dataset(dataset, cfg.data.limit)
        loader = make_training_loader(dataset, cfg, self.micro_batch, self.rank, self.world,
                                      pin_memory=mode != "memory" and self.device.type == "cuda")
        if mode in ("stream", "shards", "dataset"):
            note += f", {loader.workers} loader worker(s) (data.workers)"
        steps_per_epoch = len(loader) // cfg.trainer.accumulate
        if steps_per_epoch < 1:
            raise ConfigError(
                f"one epoch of {len(dataset)} samples gives no full step of data.batch_size="
                f"{cfg.data.batch_size}; lower the batch size"
            )
        total_steps = steps_per_epoch * cfg.trainer.epochs
        if cfg.trainer.max_steps is not None:
            total_steps = min(total_steps, cfg.trainer.max_steps)
        run_dir = Path(self._run_dir_arg) if self._continuing else make_run_dir(cfg, self._run_dir_arg)
        self._data = _TrainingData(dataset, mode, note, loader, steps_per_epoch, total_steps, run_dir)
        # methods that fit something on the data first (BEiT's tokenizer): after a resume's state is
        # loaded, so what the checkpoint brought is not refit, and before DDP broadcasts the buffers
        self.method.prepare(dataset, run_dir)
        if self.world > 1:
            if cfg.trainer.sync_bn:  # BN statistics over the global batch, as SimCLR/BYOL/SimSiam do
                if self.device.type != "cuda":
                    raise ConfigError("trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm has no CPU path)")
                self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
            self.model = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _attached(self) -> _TrainingData:
        if self._data is None:
            self.attach_data()
        assert self._data is not None
        return self._data

    @property
    def dataset(self) -> Any:
        """The training source (the configured one unless ``attach_data``/``fit`` was given data)."""
        return self._attached().dataset

    @property
    def data_mode(self) -> str:
        """How the data is read: ``memory``, ``stream``, ``shards``, ``dataset`` or ``iterable``."""
        return self._attached().mode

    @property
    def data_note(self) -> str:
        """One line saying which data mode was chosen and why (the run's first lines print it)."""
        return self._attached().note

    @property
    def loader(self) -> Any:
        return self._attached().loader

    @property
    def steps_per_epoch(self) -> int:
        return self._attached().steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self._attached().total_steps

    @property
    def run_dir(self) -> Path:
        return self._attached().run_dir

    # ---- state -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.method.state_dict(),
            "encoder": next(n for n, m in self.method.named_modules() if m is self.method.encoder),  # init_from
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "position": {"step": self.step, "epoch": self.epoch, "batch": self.batch_in_epoch},
            "history": {"train_seconds": self.history["train_seconds"], "images": self.history["images"],
                        "bad_steps": self.bad_steps_total, "wall_seconds": self.wall_seconds(),
                        "segments": self.history["segments"] + 1},
            "config": self.cfg.to_dict(),
            "versions": versions(),
        }

    def _load_state(self, ckpt: dict) -> None:
        load_weights(self.method, ckpt["model"], "the resumed checkpoint")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(f"the resumed checkpoint's optimizer state does not match this configuration: {err}") from None
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        pos = ckpt["position"]
        self.step, self.epoch, self.batch_in_epoch = pos["step"], pos["epoch"], pos["batch"]
        hist = ckpt.get("history", {})
        self.history["train_seconds"] = hist.get("train_seconds", 0.0)
        self.history["images"] = hist.get("images", 0)
        # checkpoints from before wall_seconds was kept: their training time is the best lower bound
        self.history["wall_seconds"] = hist.get("wall_seconds", self.history["train_seconds"])
        self.history["segments"] = hist.get("segments", 1)
        self.bad_steps_total = hist.get("bad_steps", 0)

    def wall_seconds(self) -> float:
        """Wall time in the trainer over every segment of the run: the earlier segments' (from the
        checkpoint) plus this session's since the Trainer was built."""
        return self.history["wall_seconds"] + time.perf_counter() - self._t_session

    def save(self, name: str = "last.ckpt") -> None:
        if self.is_main:
            save_atomic(self.state_dict(), self.run_dir / name)

    # ---- schedules ---------------------------------------------------------------------

    def _set_schedules(self) -> tuple[float, float]:
        o = self.cfg.optim
        warmup = int(round(o.warmup_epochs * self.steps_per_epoch))
        lr = cosine_schedule(self.step, self.total_steps, self.lr, o.min_lr, warmup, o.warmup_start_lr)
        wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        wd = cosine_schedule(self.step, self.total_steps, o.weight_decay, wd_end)
        for group in self.optimizer.param_groups:
            group["lr"] = (self.lr if group.get("fixed_lr") else lr) * group.get("lr_scale", 1.0)
            group["weight_decay"] = wd * group.get("wd_scale", 1.0)
        return lr, wd

    # ---- one optimizer step ------------------------------------------------------------

    def _autocast(self):
        if self.precision == "32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def train_step(self, micro_batches: list[dict]) -> tuple[float | None, dict, float, float]:
        """One optimizer step on the micro-batches at the current position: schedules, forward and
        backward, the update, then (for a kept step) the step counter and ``method.on_step_end``.
        Returns (loss, metrics, lr, weight decay); the loss is None when the step was dropped for
        a non-finite loss, which leaves the method, the optimizer and the position as they were."""
        lr, wd = self._set_schedules()
        loss, metrics = self._train_step(micro_batches)
        if loss is not None:
            self.step += 1
            self.method.on_step_end(Progress(self.step, self.total_steps, self.epoch, self.cfg.trainer.epochs,
                                             self.steps_per_epoch))
        return loss, metrics, lr, wd

    def _train_step(self, micro_batches: list[dict]) -> tuple[float | None, dict]:
        """Forward/backward over the accumulated micro-batches and one optimizer update.
        Returns (loss, metrics), or (None, {}) when the loss was not finite and the step skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        self._norm_stats.save()
        total, metrics, embeddings = 0.0, {}, None
        acc = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            torch.manual_seed(step_seed(self.cfg.trainer.seed, self.step, i, self.rank))
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            sync = self.model.no_sync() if (self.world > 1 and i < acc - 1) else nullcontext()
            with sync:
                with self._autocast():
                    out = self.model(batch)
                loss = out.loss.float()
                finite = torch.isfinite(loss).to(torch.float32)
                if self.world > 1:  # all ranks must agree to skip, or DDP would hang
                    finite = dist.all_reduce_mean(finite)
                if float(finite) < 1.0:  # drop the step and every trace of it
                    self.optimizer.zero_grad(set_to_none=True)
                    self._norm_stats.restore()
                    self.method.discard_step()
                    return None, {}
                self.scaler.scale(loss / acc).backward()
            total += float(loss.detach()) / acc
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / acc
            embeddings = out.embeddings if out.embeddings is not None else embeddings
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        metrics.update(self.monitor.update(embeddings, self.step, metrics))
        return total, metrics

    # ---- the run -----------------------------------------------------------------------

    def fit(self, data: Any = None, until_step: int | None = None) -> dict:
        """Train to the end (or, with ``until_step``, pause there as if stopped: the checkpoint
        is written and a later ``Trainer(..., resume=ckpt).fit(...)`` carries on exactly).

        ``data``: train on it instead of ``cfg.data.source`` (see ``attach_data``); a resumed
        trainer is given the same data again."""
        if data is not None:
            self.attach_data(data)
        cfg = self.cfg
        stop_at = self.total_steps if until_step is None else min(until_step, self.total_steps)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.run_dir)  # a killed run's half-written checkpoint
            dump_config(cfg, self.run_dir / "config.yaml")
        log_rows = _MetricLog(self.run_dir, enabled=self.is_main, from_step=self.step)
        bar = _progress(self.total_steps, self.step, enabled=self.is_main and cfg.trainer.progress)
        consecutive_bad = 0
        stopped_early = False
        t_start = time.perf_counter()
        images_per_step = cfg.data.batch_size
        try:
            with _StopFlag() as stop:
                while self.step < stop_at and not stopped_early:
                    self.loader.set_epoch(self.epoch)
                    self.loader.set_start_batch(self.batch_in_epoch)
                    it = iter(self.loader)
                    while self.batch_in_epoch + cfg.trainer.accumulate <= len(self.loader):
                        if self.step >= stop_at:
                            break
                        t_wait = time.perf_counter()
                        micro = [next(it) for _ in range(cfg.trainer.accumulate)]
                        t0 = time.perf_counter()
                        loss, metrics, lr, wd = self.train_step(micro)
                        self.batch_in_epoch += cfg.trainer.accumulate
                        if loss is None:
                            consecutive_bad += 1
                            self.bad_steps_total += 1
                            if consecutive_bad >= cfg.trainer.max_bad_steps:
                                raise TrainingError(
                                    f"the loss was NaN/Inf for {consecutive_bad} consecutive steps (step {self.step}); "
                                    f"stopped, the last good checkpoint is kept in {self.run_dir}. Likely causes: "
                                    f"learning rate too high (optim.lr={cfg.optim.lr}), or reduced precision "
                                    f"(trainer.precision={self.precision}; try trainer.precision=32)"
                                )
                            continue
                        consecutive_bad = 0
                        dt = time.perf_counter() - t0
                        self.data_wait.add(t0 - t_wait, dt)
                        self.history["train_seconds"] += dt
                        self.history["images"] += images_per_step
                        self._log_step(log_rows, bar, loss, lr, wd, metrics, images_per_step / max(dt, 1e-9))
                        if stop.requested:
                            stopped_early = True
                            break
                    if not stopped_early and self.batch_in_epoch + cfg.trainer.accumulate > len(self.loader):
                        self.epoch += 1
                        self.batch_in_epoch = 0
                        self._online_eval(log_rows, bar)
                        if cfg.trainer.ckpt_every and self.epoch % cfg.trainer.ckpt_every == 0:
                            self.save(f"epoch_{self.epoch}.ckpt")
                    self.save()
        finally:
            bar.close()
            log_rows.close()
            self.loader.close()  # streaming workers; a later iteration starts new ones
        wall = time.perf_counter() - t_start
        return self._summary(wall, stopped_early)

    def _online_eval(self, log_rows, bar) -> None:
        """kNN on the labeled test split every ``eval.online_every`` epochs (rank 0 only),
        logged as ``knn/top1`` so the report can plot it against epochs."""
        every = self.cfg.eval.online_every
        if not every or self.epoch % every or not self.is_main or self.history.get("online_off"):
            return
        from selfsup.evaluate import labeled_features, run_knn
        from selfsup.errors import DataError

        try:
            feats = labeled_features(self.method, self.cfg, device=self.device, precision=self.precision)
        except DataError as err:
            log.warning("online kNN is off: %s", err)
            self.history["online_off"] = True
            return
        result = run_knn(feats, self.cfg)
        k = next(iter(result))
        top1 = result[k]["top1"]
        self.history.setdefault("online_knn", []).append({"epoch": self.epoch, "step": self.step, "top1": top1})
        log_rows.write({"step": self.step, "epoch": self.epoch, "knn/top1": top1})
        bar.write(f"epoch {self.epoch}: online kNN top-1 ({k}) {top1:.2f}%")

    def _log_step(self, log_rows, bar, loss, lr, wd, metrics, img_s) -> None:
        self.last_loss = loss
        row = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "wd": wd, "img_s": img_s, **metrics}
        if self.step % self.cfg.trainer.log_every == 0 or self.step == self.total_steps:
            log_rows.write(row)
        post = {"loss": f"{loss:.4f}", "lr": f"{lr:.3g}", "img/s": f"{img_s:.0f}"}
        if self.data_wait.share is not None:
            post["wait"] = f"{self.data_wait.share:.0%}"
        advice = self.data_wait.advice(self.data_mode, self.loader.workers)
        if advice is not None and self.is_main:
            bar.write(advice, file=sys.stderr)
        if self.monitor.alarming:
            post["COLLAPSE?"] = self.monitor.alarm_reason
        bar.set_postfix(post, refresh=False)
        bar.set_description(f"epoch {self.epoch + 1}/{self.cfg.trainer.epochs}", refresh=False)
        bar.update(1)

    def _summary(self, wall: float, stopped_early: bool) -> dict:
        train_s = self.history["train_seconds"]
        summary = {
            "run_dir": str(self.run_dir),
            "method": self.cfg.method.name,
            "finished": self.step >= self.total_steps,
            "stopped_early": stopped_early,
            "position": {"step": self.step, "epoch": self.epoch, "total_steps": self.total_steps},
            "device": str(self.device),
            "precision": self.precision,
            "world_size": self.world,
            # train_seconds and wall_seconds cover every segment of a resumed run, *_this_session this one
            "timings": {"train_seconds": train_s, "wall_seconds": self.wall_seconds(),
                        "wall_seconds_this_session": wall,
                        "wall_seconds_earlier_segments": self.history["wall_seconds"],
                        "segments": self.history["segments"] + 1,
                        "images_per_second": self.history["images"] / train_s if train_s else None,
                        # share of step time spent waiting for batches, this session after its warm-up steps
                        "data_wait": self.data_wait.share},
            "peak_memory_mib": peak_memory_mib(self.device),
            "final_loss": getattr(self, "last_loss", None),
            "bad_steps_skipped": self.bad_steps_total,
            "data": {"source": self.cfg.data.source, "train_samples": len(self.dataset),
                     "skipped_images": getattr(self.dataset, "skipped", 0), "mode": self.data_mode,
                     "skip_reasons": dict(getattr(self.dataset, "skip_reasons", {}))},
            "monitor": self.monitor.summary(),
            "online_knn": self.history.get("online_knn", []),
            "versions": versions(),
            "config": self.cfg.to_dict(),
        }
        return summary


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_summary(summary: dict, run_dir: str | Path) -> None:
    write_text_atomic(Path(run_dir) / "summary.json", json.dumps(summary, indent=2, default=str))


# --------------------------------------------------------------------------------------
# logging helpers


class _MetricLog:
    """metrics.csv (always) and TensorBoard events (when tensorboard is installed).

    ``from_step`` is the step the run starts at. A run killed after its last checkpoint had logged
    rows past it; the resume trains those steps again, so their rows are dropped first (and their
    TensorBoard events purged): every step is logged once and the report's curves run forward."""

    def __init__(self, run_dir: Path, enabled: bool, from_step: int = 0) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.tb = None
        if enabled:
            self._drop_after(from_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=from_step + 1 if from_step else None)
            except Exception:  # tensorboard missing or broken: CSV still has everything
                self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        fields = self._fields()
        if any(k not in fields for k in row):  # a new column (e.g. knn/top1): rewrite with the union
            fields = fields + [k for k in row if k not in fields]
            write_text_atomic(self.path, _csv_text(fields, self._read()))
        with explain_disk_full(self.path), self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=fields).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

    def _drop_after(self, step: int) -> None:
        """Keep the whole rows up to ``step``; a row cut short by a kill (missing cells, no
        line end) goes too. The file is rewritten atomically, and only when something changes."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as fh:
            old = fh.read()
        kept = [r for r in self._read() if None not in r.values() and 0 <= _row_step(r) <= step]
        new = _csv_text(self._fields(), kept)
        if new != old:
            write_text_atomic(self.path, new)

    def _fields(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as fh:
            return next(csv.reader(fh), [])

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _csv_text(fields: list[str], rows: list[dict]) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _row_step(row: dict) -> int:
    """The row's step; -1 for a row whose step cell was cut off."""
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return -1


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                leave=True, file=sys.stderr)
