"""The demo's kNN gain over random init, over several seeds: `make demo`'s job, rerun.

Runs `selfsup pretrain` with its defaults (SimCLR on the embedded CIFAR-10 subset) once per
seed, reads each run's summary.json and reports kNN top-1 (k=20) of the pretrained encoder
and of the same encoder at random init, their difference, training time and images/s.

    python benchmarks/demo_knn.py --seeds 0 1 2 [key=value overrides ...]

Writes benchmarks/results/demo_knn.md (included in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(seed: int, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "selfsup", "pretrain", "--out", str(out), f"trainer.seed={seed}",
           f"trainer.run_name=seed{seed}", "trainer.progress=false", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / f"seed{seed}" / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_knn.md")
    args, overrides = ap.parse_known_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            s = run(seed, Path(tmp), overrides)
            k = next(iter(s["knn"]["trained"]))
            trained, rand = s["knn"]["trained"][k]["top1"], s["knn"]["random_init"][k]["top1"]
            rows.append({"seed": seed, "trained": trained, "random": rand, "gain": trained - rand,
                         "train_s": s["timings"]["train_seconds"], "img_s": s["timings"]["images_per_second"],
                         "total_s": s["timings"]["total_seconds_this_session"], "k": k})
            print(json.dumps(rows[-1]), flush=True)
    gains = [r["gain"] for r in rows]
    lines = [header("Demo: SimCLR on the embedded CIFAR-10 subset, kNN vs random init"),
             f"- overrides: `{' '.join(overrides) or '(none: the defaults of `selfsup pretrain`)'}`\n",
             f"| seed | kNN top-1 ({rows[0]['k']}) pretrained | random init | gain (points) | train s | images/s | total s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['trained']:.1f} | {r['random']:.1f} | {r['gain']:+.1f} | "
                     f"{r['train_s']:.0f} | {r['img_s']:.0f} | {r['total_s']:.0f} |")
    lines.append(f"\n**Gain: median {statistics.median(gains):+.1f} points, range "
                 f"{min(gains):+.1f} to {max(gains):+.1f}** over {len(rows)} seeds.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
