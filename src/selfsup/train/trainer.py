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
import json
import logging
import math
import os
import platform
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
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
from selfsup.train.checkpoint import load_weights, save_atomic, write_text_atomic
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
    return torch.device(pref)


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
    from selfsup.data import ImageArrayDataset

    if limit is None or limit >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return ImageArrayDataset(dataset.images[keep], dataset.labels[keep], dataset.classes,
                             name=f"{dataset.name}[{limit} of {len(dataset)}]", skipped=dataset.skipped,
                             skipped_examples=dataset.skipped_examples)


def make_run_dir(cfg: Config) -> Path:
    name = cfg.trainer.run_name
    if name is None:
        name = f"{cfg.method.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        if dist.is_dist():  # every rank must write to the same folder
            box = [name]
            tdist.broadcast_object_list(box, src=0)
            name = box[0]
    return Path(cfg.trainer.out_dir) / name


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
        from selfsup.data import BatchLoader, load_dataset

        init_distributed(cfg.trainer.device)
        self.cfg = cfg
        self.device = resolve_device(cfg.trainer.device)
        self.precision = resolve_precision(cfg.trainer.precision, self.device)
        if cfg.trainer.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.trainer.threads)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        self.run_dir = Path(run_dir) if run_dir is not None else make_run_dir(cfg)

        per_rank = cfg.data.batch_size // (self.world * cfg.trainer.accumulate)
        if per_rank * self.world * cfg.trainer.accumulate != cfg.data.batch_size or per_rank < 1:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} must divide evenly into {self.world} process(es) x "
                f"trainer.accumulate={cfg.trainer.accumulate} micro-batches"
            )
        self.micro_batch = per_rank
        self.dataset = data if data is not None else load_dataset(
            cfg.data.source, cfg.data.train_split, root=cfg.data.root, decode_size=cfg.data.decode_size,
            download=cfg.data.download)
        if cfg.data.limit is not None and cfg.data.limit < len(self.dataset):
            self.dataset = limit_dataset(self.dataset, cfg.data.limit)
        self.loader = BatchLoader(self.dataset, per_rank, shuffle=True, seed=cfg.trainer.seed, rank=self.rank,
                                  world_size=self.world, drop_last=True)
        self.steps_per_epoch = len(self.loader) // cfg.trainer.accumulate
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"one epoch of {len(self.dataset)} samples gives no full step of data.batch_size="
                f"{cfg.data.batch_size}; lower the batch size"
            )
        self.total_steps = self.steps_per_epoch * cfg.trainer.epochs
        if cfg.trainer.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.trainer.max_steps)

        self.method = build_method(cfg).to(self.device)
        self.channels_last = cfg.trainer.channels_last and self.device.type in ("cpu", "cuda")
        if self.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.method.channels_last = self.channels_last
        self.lr = cfg.optim.scaled_lr(cfg.data.batch_size)
        self.optimizer = build_optimizer(self.method, cfg.optim, self.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "16-mixed")
        self.monitor = CollapseMonitor(cfg.trainer.monitor_every)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.bad_steps_total = 0
        self.history: dict[str, Any] = {"train_seconds": 0.0, "images": 0}
        if resume is not None:
            self._load_state(resume)
        # methods that fit something on the data first (BEiT's tokenizer): after a resume's state is
        # loaded, so what the checkpoint brought is not refit, and before DDP broadcasts the buffers
        self.method.prepare(self.dataset, self.run_dir)
        self.model = self.method
        if self.world > 1:
            if cfg.trainer.sync_bn:  # BN statistics over the global batch, as SimCLR/BYOL/SimSiam do
                if self.device.type != "cuda":
                    raise ConfigError("trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm has no CPU path)")
                self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
            self.model = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ---- state -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "position": {"step": self.step, "epoch": self.epoch, "batch": self.batch_in_epoch},
            "history": {"train_seconds": self.history["train_seconds"], "images": self.history["images"],
                        "bad_steps": self.bad_steps_total},
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
        self.bad_steps_total = hist.get("bad_steps", 0)

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

    def _train_step(self, micro_batches: list[dict]) -> tuple[float | None, dict]:
        """Forward/backward over the accumulated micro-batches and one optimizer update.
        Returns (loss, metrics), or (None, {}) when the loss was not finite and the step skipped."""
        self.optimizer.zero_grad(set_to_none=True)
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
                if float(finite) < 1.0:
                    self.optimizer.zero_grad(set_to_none=True)
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

    def fit(self, until_step: int | None = None) -> dict:
        """Train to the end (or, with ``until_step``, pause there as if stopped: the checkpoint
        is written and a later ``Trainer(..., resume=ckpt).fit()`` carries on exactly)."""
        cfg = self.cfg
        stop_at = self.total_steps if until_step is None else min(until_step, self.total_steps)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        log_rows = _MetricLog(self.run_dir, enabled=self.is_main)
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
                        micro = [next(it) for _ in range(cfg.trainer.accumulate)]
                        t0 = time.perf_counter()
                        lr, wd = self._set_schedules()
                        loss, metrics = self._train_step(micro)
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
                        self.step += 1
                        self.method.on_step_end(Progress(self.step, self.total_steps, self.epoch,
                                                         cfg.trainer.epochs, self.steps_per_epoch))
                        dt = time.perf_counter() - t0
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
            "timings": {"wall_seconds_this_session": wall, "train_seconds": train_s,
                        "images_per_second": self.history["images"] / train_s if train_s else None},
            "peak_memory_mib": peak_memory_mib(self.device),
            "final_loss": getattr(self, "last_loss", None),
            "bad_steps_skipped": self.bad_steps_total,
            "data": {"source": self.cfg.data.source, "train_samples": len(self.dataset),
                     "skipped_images": getattr(self.dataset, "skipped", 0)},
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
    """metrics.csv (always) and TensorBoard events (when tensorboard is installed)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.rows: list[dict] = []
        self.path = run_dir / "metrics.csv"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:  # tensorboard missing or broken: CSV still has everything
                self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        fields = self._fields()
        if any(k not in fields for k in row):  # a new column (e.g. knn/top1): rewrite with the union
            rows = self._read()
            fields = fields + [k for k in row if k not in fields]
            with self.path.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=fields).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

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


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                leave=True, file=sys.stderr)
