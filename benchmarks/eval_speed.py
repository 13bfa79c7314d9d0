"""Speed of the frozen-feature evaluations in selfsup.eval.

Times, on random features (the numbers are about speed, not accuracy):

* ``knn_classify``: a 50,000 x 512 bank, 10,000 queries, 10 classes, k = 20 and 200;
* ``linear_probe``: 10 epochs (batch 256, BatchNorm + SGD) on the same features,
  evaluated on the 10,000 queries after every epoch;
* the float32 matmul throughput of the machine, since exact kNN is bound by
  the ``queries x bank`` matmul (2 * Q * N * D flops).

Usage::

    PYTHONPATH=src python benchmarks/eval_speed.py [--bank 50000 --queries 10000 --dim 512 --threads 2]

Prints the timings and writes ``benchmarks/results/eval_speed.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

import torch

from selfsup.eval import format_table, knn_classify, linear_probe

RESULTS = Path(__file__).resolve().parent / "results" / "eval_speed.md"


def load_average() -> str:
    """1-minute load average: a busy shared machine slows every number below."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def random_split(n: int, dim: int, num_classes: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features with uniformly random labels."""
    return torch.randn(n, dim, generator=generator), torch.randint(0, num_classes, (n,), generator=generator)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Wall-clock seconds of one call, and its result."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def matmul_gflops(dim: int, bank: int, rows: int = 1024, repeats: int = 3) -> float:
    """Best-of-``repeats`` float32 GEMM throughput for a (rows x dim) @ (dim x bank) product."""
    a, b = torch.randn(rows, dim), torch.randn(bank, dim)
    a @ b.T  # warm-up
    best = min(timed(torch.matmul, a, b.T)[0] for _ in range(repeats))
    return 2 * rows * dim * bank / best / 1e9


def write_report(path: Path, rows: dict[str, object], command: str, load: str) -> None:
    """Markdown report with date, machine, command and the timing table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# selfsup.eval speed",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}; CPU: {cpu_model()}; {os.cpu_count()} logical CPUs; "
        f"torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- 1-min load average at start: {load}",
        f"- command: `{command}`",
        "",
        "```",
        format_table(rows),
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    bank_x, bank_y = random_split(args.bank, args.dim, args.classes, generator)
    query_x, query_y = random_split(args.queries, args.dim, args.classes, generator)
    load = load_average()
    rows: dict[str, object] = {}

    gflops = matmul_gflops(args.dim, args.bank)
    flops = 2 * args.queries * args.bank * args.dim
    rows["matmul GFLOP/s (fp32)"] = gflops
    rows["knn matmul lower bound s"] = flops / gflops / 1e9

    knn_classify(bank_x[:1000], bank_y[:1000], query_x[:100], query_y[:100])  # warm-up
    seconds, _ = timed(knn_classify, bank_x, bank_y, query_x, query_y, ks=(20, 200))
    rows[f"knn {args.bank}x{args.dim} bank, {args.queries} queries, k=20,200 s"] = seconds
    print(f"knn_classify: {seconds:.2f} s", flush=True)

    linear_probe(bank_x[:512], bank_y[:512], query_x[:64], query_y[:64], epochs=1, progress=False)  # warm-up
    seconds, probe = timed(
        linear_probe, bank_x, bank_y, query_x, query_y, epochs=args.epochs, batch_size=256, progress=False
    )
    rows[f"linear probe {args.epochs} epochs s"] = seconds
    rows["linear probe s/epoch"] = seconds / args.epochs
    print(f"linear_probe ({args.epochs} epochs): {seconds:.2f} s (last top-1 {probe['last_top1']:.2f}%)", flush=True)

    command = "PYTHONPATH=src python " + " ".join(shlex.quote(a) for a in sys.argv)
    write_report(args.out, rows, command, load)
    print(format_table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
