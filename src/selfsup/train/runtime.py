"""Around the loop: the run's folder (claimed once, never a second run in it) and the stop flag
that turns Ctrl-C / SIGTERM into a checkpoint after the current step."""

from __future__ import annotations

import itertools
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch.distributed as tdist

from selfsup import dist
from selfsup.config import Config
from selfsup.errors import ConfigError

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


class StopFlag:
    """First Ctrl-C (or SIGTERM from a scheduler) asks the loop to save and stop after the
    current step; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
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
