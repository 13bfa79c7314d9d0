"""What every benchmark records beside its numbers: machine, date, command."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    import os

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()} ({os.cpu_count()} logical CPUs){gpu}; {platform.platform()}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def run_meta(script: str) -> dict:
    """What a benchmark's JSON rows carry beside their numbers: machine (CPU and torch threads), date,
    the command that ran (``script`` and this process's arguments) and the torch version."""
    import datetime as dt

    return {"machine": f"{cpu_model()}, {torch.get_num_threads()} threads", "date": dt.date.today().isoformat(),
            "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]), "torch": torch.__version__}


def peak_rss_mib() -> float:
    """This process's peak resident set in MiB (VmHWM). Not ``ru_maxrss``: Linux carries that across
    ``exec`` from the parent, so a child started by a benchmark would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def header(title: str) -> str:
    cmd = " ".join([Path(sys.executable).name, *sys.argv])
    return (f"## {title}\n\n- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
            f"- machine: {machine()}\n- command: `{cmd}`\n")


# labeled test images behind each data source's kNN score, for rows that do not record it (the embedded
# subset's test split is 1,000 images)
TEST_IMAGES = {"embedded": 1000, "cifar10": 10000}


def test_images(row: dict) -> int | None:
    """How many test images a kNN row's score rests on (recorded, or known for the data source)."""
    return row.get("test_images") or TEST_IMAGES.get(row["data"])


def verdict(row: dict) -> str:
    """"above" / "below" random init when the gain exceeds two binomial standard errors of the trained
    top-1 on the test split (sqrt(p(1-p)/n): 1.5 points at 30% on 1,000 images), else "within noise"."""
    n = test_images(row)
    if not n:
        return "?"
    p = row["trained"] / 100
    margin = 200 * (p * (1 - p) / n) ** 0.5
    gain = row["trained"] - row["random"]
    return "above" if gain > margin else "below" if gain < -margin else "within noise"
