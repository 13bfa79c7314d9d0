"""The training loop: the data it trains on, the step, schedules, checkpoints and resume.

Around it: ``selfsup.core.runtime`` (device, precision, seeds, the process group),
``train/runtime.py`` (the run folder, the stop flag), ``train/logging.py`` (metrics log,
progress bar, data wait, summary).

Distributed runs use plain ``torch.distributed`` + DDP, started by ``torchrun`` (we read its
RANK / WORLD_SIZE / LOCAL_RANK variables). We chose it over Lightning Fabric because the loop
is short, exact resume and atomic checkpoints need control over every byte we save, and it
keeps the dependency list to PyTorch itself; a one-process CPU run and a multi-GPU run go
through the same code.

The trainer never knows which method it runs: it calls ``method(batch) -> StepOutput`` and
``method.on_step_end(progress)``.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from selfsup import dist
from selfsup.checkpoint import load_weights, remove_stale_temp_files, save_atomic
from selfsup.config import Config, dump_config
from selfsup.core.build import build_method, resolve_config
from selfsup.core.method import Progress
from selfsup.core.runtime import (
    init_distributed,
    resolve_device,
    resolve_precision,
    step_seed,
    versions,
)
from selfsup.data.loader import limit_dataset
from selfsup.errors import ConfigError, TrainingError
from selfsup.nn.schedules import cosine_schedule, wsd_schedule
from selfsup.train.logging import DataWait, MetricLog, peak_memory_mib, progress_bar
from selfsup.train.monitor import CollapseMonitor
from selfsup.train.optim import build_optimizer
from selfsup.train.runtime import StopFlag, make_run_dir, refuse_held_run_dir

log = logging.getLogger("selfsup")


# --------------------------------------------------------------------------------------
# the data


def open_training_data(cfg: Config, data=None) -> tuple[Any, str, str]:
    """(source, mode, one-line note) of the training split: read by the reader of the source's
    modality (selfsup.modalities; for images ``data.mode``'s choice, data/modes.py). ``data``, a
    source built by the caller, is used as given."""
    from selfsup.data.shards import ShardStream
    from selfsup.data.sources import FolderStream
    from selfsup.data.user import BatchIterable, SampleSource
    from selfsup.registry import get_modality, run_modality

    if data is not None:
        kinds = ((FolderStream, "stream"), (ShardStream, "shards"), (SampleSource, "dataset"),
                 (BatchIterable, "iterable"))
        mode = next((name for kind, name in kinds if isinstance(data, kind)), "memory")
        what = {"dataset": "a Dataset of samples given to the Trainer, read by the loader workers",
                "iterable": "an iterable of batches given to the Trainer, read as it comes"}
        return data, mode, f"{mode} ({what.get(mode, 'a source given to the Trainer')})"
    # config validation already refused a source of another modality
    opened = get_modality(run_modality(cfg.method.name, cfg.backbone.name, cfg.data.source)).open(cfg, cfg.data.train_split)
    return opened.dataset, opened.mode, opened.note


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


# --------------------------------------------------------------------------------------
# the loop


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None, resume: dict | None = None,
                 data=None) -> None:
        self._t_session = time.perf_counter()  # this session's wall time counts from here (setup included)
        init_distributed(cfg.trainer.device)
        cfg = resolve_config(cfg)  # what the data fixes before the encoder is built (a text run's tokenizer)
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
        warmup = o.warmup_steps if o.warmup_steps is not None else int(round(o.warmup_epochs * self.steps_per_epoch))
        if o.schedule == "wsd":
            cooldown = int(round(o.cooldown_epochs * self.steps_per_epoch))
            lr = wsd_schedule(self.step, self.total_steps, self.lr, o.min_lr, warmup, o.warmup_start_lr, cooldown)
        else:
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
        self.units_last_step = sum(self.method.count(b) for b in micro_batches) * self.world
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
        log_rows = MetricLog(self.run_dir, enabled=self.is_main, from_step=self.step)
        bar = progress_bar(self.total_steps, self.step, enabled=self.is_main and cfg.trainer.progress)
        consecutive_bad = 0
        stopped_early = False
        t_start = time.perf_counter()
        try:
            with StopFlag() as stop:
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
                        self.history["images"] += self.units_last_step  # images, or the method's unit
                        self._log_step(log_rows, bar, loss, lr, wd, metrics, self.units_last_step / max(dt, 1e-9))
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
        from selfsup.errors import DataError
        from selfsup.evaluate import labeled_features, run_knn

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
        unit = {"images": "img/s", "tokens": "tok/s"}.get(self.method.unit, f"{self.method.unit}/s")
        post = {"loss": f"{loss:.4f}", "lr": f"{lr:.3g}", unit: f"{img_s:.0f}"}
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
                        f"{self.method.unit}_per_second": self.history["images"] / train_s if train_s else None,
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


