"""What a run reports while it trains: the metrics log (metrics.csv, TensorBoard), the progress
bar, the data-wait share, the summary, peak memory."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import torch

from selfsup.checkpoint import explain_disk_full, write_text_atomic


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
        if mode == "iterable":
            fix = (f"the batches come from the iterable given to fit() ({workers} worker(s)): give its DataLoader more "
                   "num_workers, or pass a Dataset of samples so that data.workers decode them")
        elif mode == "dataset":
            fix = f"raise data.workers (now {workers}), or make the Dataset's __getitem__ cheaper"
        elif mode != "memory":
            fix = f"raise data.workers (now {workers}), or use data.mode=memory if the decoded set fits in RAM"
        else:
            fix = "the batches come from memory, so check for other processes on these cores (trainer.threads)"
        return f"the data loader is the bottleneck: {share:.0%} of each step waits for data; {fix}"


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


class MetricLog:
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


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                leave=True, file=sys.stderr)
