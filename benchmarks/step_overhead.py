"""What a selfsup training step costs beyond the model's own work: ours vs the model-only ceiling.

For each method, two copies of the same model are built from the method's CIFAR-10 recipe (same
backbone, precision, memory format and optimizer) and timed side by side, in alternating rounds:

* **selfsup**: ``Trainer.fit`` on the embedded CIFAR-10 subset, the step as a user gets it: batched
  augmentation on the device, lr/wd schedules, forward and backward under the recipe's precision,
  the optimizer, the method's step hook (EMA teachers, momentum schedules), the collapse monitor
  and metric logging (CSV and TensorBoard). Its per-step time is the trainer's own
  ``train_seconds`` (fetching the in-memory batch and writing checkpoints are outside it).
* **ceiling**: the same method on views made once up front (``make_views`` answers from a cache),
  in a bare loop: ``zero_grad``, forward under the same autocast, ``backward``,
  ``optimizer.step``, the step hook. No augmentation, no monitor, no logging: the most a
  hand-written loop around the same model could save. Its lr and weight decay are set to the
  trainer's current values before each round, outside the timing: a first version kept the
  warm-up's starting lr (about 0), and its model, not learning, stepped up to 8% faster (DINO).

``selfsup / ceiling`` is the overhead as a ratio (1.00x: none). The augmentation alone
(``make_views`` on a fresh uint8 batch) is timed in the same rounds, to say how much of the gap it
explains. Times are medians over rounds after one warm-up round.

    PYTHONPATH=src python benchmarks/step_overhead.py [--methods simclr byol mae] [--batch 128]

Prints the table and writes ``benchmarks/results/step_overhead.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

import torch  # noqa: E402

from selfsup.config import load_config  # noqa: E402
from selfsup.data import load_dataset  # noqa: E402
from selfsup.core.method import Progress  # noqa: E402
from selfsup.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "step_overhead.md"
DEFAULT_METHODS = ["simclr", "byol", "swav", "dino", "mae", "ijepa"]


def build(method: str, batch: int, run_dir: Path, data) -> Trainer:
    cfg = load_config(ROOT / "configs" / method / "cifar10.yaml", [
        "data.source=embedded", f"data.batch_size={batch}", "trainer.progress=false",
        "eval.online_every=0", "eval.final_knn=false", "trainer.epochs=100"])
    return Trainer(cfg, run_dir=run_dir, data=data)


def ceiling_step(t: Trainer, batch: dict, progress: Progress) -> None:
    """The model's own work for one step, with nothing around it."""
    t.optimizer.zero_grad(set_to_none=True)
    with t._autocast():
        out = t.method(batch)
    out.loss.float().backward()
    t.optimizer.step()
    t.method.on_step_end(progress)


def measure(method: str, batch: int, rounds: int, steps: int, data) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ours = build(method, batch, Path(tmp) / "ours", data)
        ceil = build(method, batch, Path(tmp) / "ceiling", data)
        images = next(iter(ceil.loader))["images"].to(ceil.device)
        fixed = ceil.method.make_views(images)
        ceil.method.make_views = lambda _images: fixed  # views made once: augmentation is overhead
        cbatch = {"images": images}
        ours_s, ceil_s, aug_s = [], [], []
        for r in range(rounds + 1):  # round 0 warms up both
            before = ours.history["train_seconds"]
            ours.fit(until_step=ours.step + steps)
            t_ours = (ours.history["train_seconds"] - before) / steps
            ceil.step = ours.step  # the same lr and wd as the trainer's: the values change the numbers
            ceil._set_schedules()  # (and so the speed, e.g. through subnormals), the call costs nothing
            progress = Progress(ours.step, ceil.total_steps, 0, ceil.cfg.trainer.epochs, ceil.steps_per_epoch)
            t0 = time.perf_counter()
            for _ in range(steps):
                ceiling_step(ceil, cbatch, progress)
            t_ceil = (time.perf_counter() - t0) / steps
            with torch.no_grad():
                t0 = time.perf_counter()
                ours.method.__class__.make_views(ours.method, images)
                t_aug = time.perf_counter() - t0
            if r:
                ours_s.append(t_ours)
                ceil_s.append(t_ceil)
                aug_s.append(t_aug)
        backbone = ours.cfg.backbone.name
        precision = ours.precision
    o, c, a = (statistics.median(x) for x in (ours_s, ceil_s, aug_s))
    per_round = [x / y for x, y in zip(ours_s, ceil_s)]
    return {"method": method, "backbone": backbone, "precision": precision, "ours_ms": 1e3 * o,
            "ceil_ms": 1e3 * c, "aug_ms": 1e3 * a, "ratio": o / c, "rest_ms": 1e3 * (o - c - a),
            "ratio_min": min(per_round), "ratio_max": max(per_round)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per round and contender")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    data = load_dataset("embedded", "train")
    load = os.getloadavg()
    rows = []
    for m in args.methods:
        row = measure(m, args.batch, args.rounds, args.steps, data)
        rows.append(row)
        print(f"{m:8s} selfsup {row['ours_ms']:8.1f} ms  ceiling {row['ceil_ms']:8.1f} ms  "
              f"{row['ratio']:.3f}x [{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]  (augmentation {row['aug_ms']:.1f} ms, rest {row['rest_ms']:+.1f} ms)",
              flush=True)
    load_after = os.getloadavg()
    lines = [header("Training-step overhead: selfsup vs the model-only ceiling"),
             f"- torch threads: {torch.get_num_threads()}; batch {args.batch}; {args.rounds} rounds of "
             f"{args.steps} steps per contender after one warm-up round, medians",
             f"- load average (1/5/15 min) before / after: {' / '.join(f'{x:.2f}' for x in (*load, *load_after))}",
             "",
             "Each method's CIFAR-10 recipe (its own backbone, precision and optimizer), built twice and",
             "timed in alternating rounds. selfsup: the `Trainer` step (augmentation on the device, schedules,",
             "forward/backward, optimizer, step hook, collapse monitor, CSV + TensorBoard logging). Ceiling:",
             "the same model on views made once, in a bare zero_grad / forward / backward / step / hook loop,",
             "at the trainer's current lr and weight decay (set between rounds, untimed).",
             "Augmentation: the method's `make_views` alone; rest = selfsup - ceiling - augmentation (the",
             "trainer's bookkeeping, within the noise of the step times).",
             "",
             "Per-round ratios: the spread of selfsup / ceiling over the rounds (round-to-round noise).",
             "",
             "| method | backbone | precision | selfsup ms/step | ceiling ms/step | selfsup / ceiling | per-round ratios | augmentation ms | rest ms |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['backbone']} | {r['precision']} | {r['ours_ms']:.1f} | {r['ceil_ms']:.1f} "
                     f"| {r['ratio']:.3f}x | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['aug_ms']:.1f} "
                     f"| {r['rest_ms']:+.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
