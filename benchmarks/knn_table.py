"""Every image method, the same short budget, one table: kNN top-1 vs random init, img/s, memory.

Each method trains from its own CIFAR recipe (configs/<method>/cifar10.yaml) with the budget
overrides below applied on top (data, backbone, epochs, batch), then `selfsup pretrain` reports
kNN (k=20) of the trained encoder and of the same encoder at random init.

    python benchmarks/knn_table.py                      # all methods, CPU budget
    python benchmarks/knn_table.py --methods simclr byol --epochs 4
    python benchmarks/knn_table.py --epochs 100 --data cifar10 backbone.width=64   # GPU budget

Writes benchmarks/results/knn_table.md (included in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recipes() -> list[str]:
    return sorted(p.parent.name for p in (ROOT / "configs").glob("*/cifar10.yaml") if not p.parent.name.startswith("_"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=None, help="default: every configs/*/cifar10.yaml")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data", default="embedded")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "knn_table.md")
    args, extra = ap.parse_known_args()
    budget = [f"data.source={args.data}", f"trainer.epochs={args.epochs}", f"data.batch_size={args.batch_size}",
              "backbone.width=16", "backbone.cifar_stem=true", "trainer.ckpt_every=0", "trainer.progress=false",
              "optim.warmup_epochs=1", *extra]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods or recipes():
            cmd = [sys.executable, "-m", "selfsup", "pretrain", "--config", f"configs/{name}/cifar10.yaml",
                   "--out", tmp, f"trainer.run_name={name}", *budget]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"method": name, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]})
                print(f"{name}: FAILED {rows[-1]['error']}", flush=True)
                write_table(args, budget, rows)
                continue
            s = json.loads((Path(tmp) / name / "summary.json").read_text())
            k = next(iter(s["knn"]["trained"]))
            row = {"method": name, "k": k, "trained": s["knn"]["trained"][k]["top1"],
                   "random": s["knn"]["random_init"][k]["top1"], "img_s": s["timings"]["images_per_second"],
                   "train_s": s["timings"]["train_seconds"], "mem": s.get("peak_memory_mib"),
                   "loss": s["final_loss"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_table(args, budget, rows)  # after every method, so a cut-short run keeps its rows
    print(write_table(args, budget, rows))


def write_table(args, budget: list[str], rows: list[dict]) -> str:
    lines = [header(f"kNN after a short budget: every image method on {args.data}"),
             f"- budget (on top of each recipe): `{' '.join(budget)}`\n",
             "| method | kNN top-1 (k20) | random init | gain | images/s | train s | peak memory MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['trained']:.1f} | {r['random']:.1f} | {r['trained'] - r['random']:+.1f} | "
                         f"{r['img_s']:.0f} | {r['train_s']:.0f} | {r['mem']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
