"""Assemble BENCHMARKS.md from the result files the benchmark scripts write.

    python benchmarks/build_md.py

Each section in benchmarks/results/*.md was written by the script named in its `command:` line,
with the machine and date beside the numbers; this only stitches them together (and copies each
method's kNN-table gain into the status column of README's methods table).
"""

import json
import re
from pathlib import Path

from _common import test_images, verdict
from knn_table import _epochs

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["demo_knn", "knn_table_gpu", "knn_table_gpu_ijepa_lr", "knn_table_gpu_jigsaw_image", "knn_table_c10k", "knn_table_c10k_seed1", "knn_table", "knn_tuning", "lightly_speed", "step_overhead", "augment_speed", "eval_speed"]

INTRO = """# Benchmarks

Every number here was produced by a script in `benchmarks/`; each section names the machine,
the date and the command that produced it, so anyone can rerun it. Rebuild this file with
`python benchmarks/build_md.py` after rerunning a benchmark. CPU timings come from a shared
2-core machine and are only comparable inside one section (ratios measured side by side).

## Summary

@SUMMARY@

## How to read the tables

Each section states its protocol once, above its table: the machine, date and command, then
what every row shares. What follows applies across sections.

The CPU kNN tables train every image method for the same short CPU budget and compare it with the
same encoder at random init. The one on 10,000 test images of CIFAR-10 (a margin of about 1 point)
is the one README's status column reads, after the GPU-budget table where a method has a row there;
the 1,000-image table on the embedded data (a margin of about 3 points) is the one that reruns from
a clone with nothing extracted.

The demo section and the CPU kNN tables' rows were run on 2026-11-29 (a few on 2026-11-30, as their dates say) on a 2-core AMD EPYC with
AVX-512 bf16, so `precision: auto` trained in bf16 autocast (the demo's three seeds ran alone, 34-37 s
of training each; on the AVX2-only machine of 2026-11-23, in fp32, seed 2 took 117 s alone). Two to
four kNN-table runs shared the two cores at a time (each on one thread), so its images/s compare
methods only roughly; the kNN values do not depend on load.

The GPU-budget table (`knn_table.py --budget gpu`) ran on 2026-11-30 on one NVIDIA H200 lent for 15
minutes, for the methods the CPU budget left narrow (BEiT, I-JEPA) or below random init (jigsaw,
then read on whole images; its row is in a section of its own since tile features became its default
evaluation), with MAE beside them as the masked-modelling reference. It trains on all 50,000 CIFAR-10 training
images with each recipe's own backbone. Each run's epochs were sized to fill about 7 minutes: a
40-step probe of the five runs side by side measured their speed first. MAE, I-JEPA, jigsaw and the
I-JEPA lr variant then shared the GPU, five runs at a time with a 3-step run of every image method
alongside. That check, on every method, ran on CUDA without error, and so did a CUDA resume and the
CUDA masking test. BEiT's first run, 46 epochs, passed the time limit and was cut off; it was rerun
alone at 30 epochs. Its images/s is therefore the only one measured on an unshared GPU.
`benchmarks/gpu_session.sh` is that session's script, from the probe to the packed logs.

Which SimSiam and I-JEPA variant the rows ran, where the code once said otherwise: every SimSiam
row trained its predictor at the constant base lr and the rest on the cosine schedule (the
paper's variant, the official `--fix-pred-lr`; the trainer has held `fixed_lr` groups there since
2026-11-23). Every I-JEPA row (CPU, GPU and tuning tables) warmed up from lr 0, while the official
warm-up, which both I-JEPA recipes now set (`optim.warmup_start_lr: 2.0e-4`), starts at 2e-4: add
`optim.warmup_start_lr=0` to rerun one of those rows as it ran.

Every kNN row in this file was run before the fixes of 2026-12-02 (issue 17) and has not been
rerun since; what each fix can change in them: SimCLR's NT-Xent computed its logits in bf16 under
autocast and Barlow Twins' cross-correlation summed in
bf16, so the bf16 rows of those two trained on slightly different gradients (every loss is now
fp32, `tests/test_loss_precision.py`; SwAV's prototype scores too); the SwAV, DINO, DINOv2 and MoCo v2 state
updates (queues, centres) now run after the optimizer step, which gives the same numbers for any
run that dropped no step and accumulated no gradients (none of the rows accumulated; they did
not record dropped steps); the I-JEPA rows warmed up from lr 0 (above); and each row's random-init
column is one encoder (seed = trainer.seed), where the pretraining summary now averages three.
"""


def main() -> None:
    results = ROOT / "benchmarks" / "results"
    files = sorted(results.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    parts = [INTRO.replace("@SUMMARY@", summary(results, files))]
    for f in files:
        text = f.read_text().strip()
        if text.startswith("# "):  # demote a result file's title to a section
            text = "#" + text
        parts.append(text)
    (ROOT / "BENCHMARKS.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote BENCHMARKS.md from {len(files)} result files")
    readme_status([results / "knn_rows_c10k", results / "knn_rows"], seed_dir=results / "knn_rows_c10k_seed1",
                  gpu_dir=results / "knn_rows_gpu")


def anchor(title: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return "#" + re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def summary(results: Path, files: list[Path]) -> str:
    """The one-screen summary: each headline figure as one line linking to its section. The kNN
    lines are counted from the rows; the others quote the figure their section's table holds."""
    titles = {f.stem: f.read_text().strip().splitlines()[0].lstrip("#").strip() for f in files}

    def link(stem: str, text: str) -> str:
        return f"[{text}]({anchor(titles[stem])})" if stem in titles else text

    def rows(name: str) -> list[dict]:
        folder = results / name
        return [r for r in (json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))) if "error" not in r] \
            if folder.exists() else []

    lines = []
    demo = re.search(r"\*\*Gain: (.*?)\*\*", (results / "demo_knn.md").read_text())
    if demo:
        lines.append(f"- `make demo` (SimCLR, embedded CIFAR-10 subset, CPU): kNN gain over random init {demo.group(1)} "
                     f"({link('demo_knn', 'demo')})")
    for name, stem, what in (("knn_rows_c10k", "knn_table_c10k", "short CPU budget, 10,000 test images"),
                             ("knn_rows", "knn_table", "short CPU budget, the embedded 1,000 test images"),
                             ("knn_rows_gpu", "knn_table_gpu", "GPU budget, one H200, about 7 min a run")):
        got = rows(name)
        if got:
            above = sorted(r["method"] for r in got if verdict(r) == "above")
            lines.append(f"- kNN above random init ({what}): {len(above)} of {len(got)} methods "
                         f"({link(stem, 'table')})")
    lines += [f"- {text} ({link(stem, 'table')})" for stem, text in QUOTED]
    return "\n".join(lines)


# figures quoted from their sections' tables (rerun the section's command to refresh them)
QUOTED = [
    ("data_path", "Data path at 224 px, ResNet-50 and ViT-S/16 SimCLR steps on a 2-core CPU, 5k to 50k images: "
                  "streamed folders and shards wait for data in under 0.1% of step time, at 0.92-1.27x the speed "
                  "on ready tensors (the spread of few-step timings), and peak RSS stays flat (ResNet-50: 4,121 / "
                  "4,029 / 4,075 MiB streamed at 5k / 20k / 50k)"),
    ("shard_read", "Reading shards (20,000 224-px JPEGs, 2 workers, no model, warm cache): selfsup's indexed reader "
                   "1,700-1,950 images/s, litdata 1,960, webdataset's own stream 1,420-1,460"),
    ("lightly_speed", "SimCLR vs lightly 1.6.0, same model and batch: 1.44-1.54x the images/s on `make demo`'s "
                      "ResNet-18 (width 16), 1.04-1.06x on the full ResNet-18"),
    ("step_overhead", "Training-step overhead vs the same model stepped on ready views: 0.95-1.02x for SimCLR, "
                      "BYOL, SwAV, DINO, MAE, I-JEPA"),
    ("augment_speed", "Batched augmentation vs kornia on the same batch: 1.8-3.0x faster"),
    ("text_probe", "Text methods (MLM, T5, data2vec) after 300 CPU steps vs their random-init encoder: held-out "
                   "masked-token / span accuracy far above random init; frozen SST-2 and AG News probes not above it "
                   "at this budget"),
    ("series_probe", "Time series: PatchTST's ETTh1 linear-probe forecast (H = 96, 400 CPU steps, 1 seed) at MSE "
                     "0.376 beside the paper's 0.371, but not below the same encoder at random init (0.371); on UCR/UEA "
                     "sets (3 seeds) SimCLR and VICReg with TS-TCC's views reach 100.0 on BasicMotions (random init "
                     "97.5), TS-JEPA's logistic probe gains +51.7 points and the forecasting pretext's +33.3 on "
                     "BasicMotions but both lose on GunPoint, cross-variable prediction does not beat random init; "
                     "the forecasting pretext's and cross-variable prediction's frozen ETTh1 forecasts (MSE 0.417, 0.436) "
                     "are below their random init (0.380, 0.375)"),
    ("audio_probe", "Audio on the embedded spoken digits (840 CPU steps): digit linear probe +8.7 points over random "
                    "init for Audio-MAE (3 seeds), +14.2 for data2vec audio (2 seeds); both below a time-averaged "
                    "log-mel baseline (91.0) at this budget"),
    ("nanogpt_anchor", "Causal LM vs nanoGPT's shakespeare_char CPU recipe, same settings, side by side: validation "
                       "loss 1.8972 vs nanoGPT's 1.8982 after 2,000 steps; 0.98x its tokens/s by the median step, "
                       "1.00x by the mean"),
]


_SAID = {"above": "beats random init", "below": "below random init", "?": "not judged (test size unknown)"}


def readme_status(rows_dirs: list[Path], readme: Path = ROOT / "README.md", seed_dir: Path | None = None,
                  gpu_dir: Path | None = None) -> None:
    """Fill README's methods-table status cells (<!-- knn:NAME -->...<!-- /knn -->) from the kNN rows,
    each from the first directory of ``rows_dirs`` that has a row for the method (the 10,000-image
    protocol before the 1,000-image one); the cell names how many test images its score rests on.
    A method with a second-seed row in ``seed_dir`` gets its gain too, and "not settled" when the
    two seeds' verdicts differ. A method with a row in ``gpu_dir`` (knn_table.py --budget gpu: the
    longer run) leads with that row's verdict, and the CPU-budget cell follows it."""
    text = readme.read_text()

    def gpu(name: str, cpu_cell: str | None) -> str | None:
        path = gpu_dir / f"{name}.json" if gpu_dir is not None else None
        if path is None or not path.exists():
            return cpu_cell
        r = json.loads(path.read_text())
        if "error" in r:
            return cpu_cell
        n, m = test_images(r), r.get("train_images")
        cell = (f"{_SAID.get(verdict(r), 'within noise of random init')} after the GPU budget: kNN {r['trained']:.1f} "
                f"vs {r['random']:.1f} ({r['trained'] - r['random']:+.1f}), {_epochs(r)} epochs of "
                f"{f'{m:,}' if m else 'the'} training images, {f'{n:,}' if n else 'an unknown number of'} test images")
        return cell if cpu_cell is None else f"{cell}; {cpu_cell}"

    def status(m: re.Match) -> str:
        path = next((d / f"{m.group(1)}.json" for d in rows_dirs if (d / f"{m.group(1)}.json").exists()), None)
        if path is None:
            cell = gpu(m.group(1), None)
            return m.group(0) if cell is None else f"<!-- knn:{m.group(1)} -->{cell}<!-- /knn -->"
        r = json.loads(path.read_text())
        if "error" in r:
            cell = "kNN table run failed (BENCHMARKS.md)"
        else:
            gain = r["trained"] - r["random"]
            said = _SAID.get(verdict(r), "within noise of random init")
            n = test_images(r)
            cell = (f"{said}: kNN {r['trained']:.1f} vs {r['random']:.1f} ({gain:+.1f}) after the CPU budget, "
                    f"{f'{n:,}' if n else 'an unknown number of'} test images")
            seed = seed_dir / f"{m.group(1)}.json" if seed_dir is not None else None
            if seed is not None and seed.exists():
                s1 = json.loads(seed.read_text())
                if "error" not in s1 and test_images(s1) == n:  # a second seed of the same protocol
                    if verdict(s1) != verdict(r):
                        cell = "not settled: " + cell.split(": ", 1)[1]
                    cell += (f"; with trainer.seed=1 {s1['trained']:.1f} vs {s1['random']:.1f} "
                             f"({s1['trained'] - s1['random']:+.1f}, {verdict(s1)})")
        return f"<!-- knn:{m.group(1)} -->{gpu(m.group(1), cell)}<!-- /knn -->"

    readme.write_text(re.sub(r"<!-- knn:(\w+) -->.*?<!-- /knn -->", status, text))
    print(f"updated {readme.name}'s method status from", ", ".join(d.name for d in rows_dirs))


if __name__ == "__main__":
    main()
