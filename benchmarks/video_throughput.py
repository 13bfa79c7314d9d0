"""Video pipeline throughput: clips/s of a whole training run that decodes its clips from files, against the
model-only ceiling, with the share of step time spent waiting for data.

Data: a folder of ``--videos`` links to the real footage ``../shared/data/video/nasa_13013.mp4`` (325 frames,
320 x 180 H.264), listed as a streamed source: every clip is decoded by PyAV in a loader worker (16 frames every 4
from a random start, the shorter side resized to the crop side and centre-cropped), then cropped and normalized
on the device. Model: VideoMAE on a small video ViT (``--depth`` blocks of ``video_vit_tiny``, 16 x 16 x 2
tubelets at ``--size`` px), batch ``--batch``. Three timings, one after the other (two jobs at once on 2 cores
slow each other far more than 2x):

* **decode only**: the stream loader's batches, no model: what the workers deliver;
* **ceiling**: the same model stepped (forward, backward, AdamW) on one batch decoded up front, nothing else;
* **pipeline**: ``Trainer.fit`` on the folder, the step as a user gets it (decode in ``--workers`` workers,
  device crops, schedules, logging); clips/s from its summary, and its ``data_wait`` share.

torchcodec is not timed: it needs a system FFmpeg, which this machine lacks (``selfsup.data.video`` says so when
``data.video_decoder=torchcodec`` is asked for).

    PYTHONPATH=src python benchmarks/video_throughput.py [--steps 12] [--workers 1]

Writes ``benchmarks/results/video_throughput.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "video_throughput.md"
FOOTAGE = ROOT.parent / "shared" / "data" / "video" / "nasa_13013.mp4"


def overrides(folder: Path, args, out: Path) -> list[str]:
    return [f"data.source={folder}", "data.mode=stream", f"data.workers={args.workers}", "data.frames=16",
            "data.frame_stride=4", f"data.frame_size={args.size}", f"data.batch_size={args.batch}",
            "backbone.name=video_vit_tiny", f"backbone.depth={args.depth}", "backbone.patch_size=16",
            "method.name=videomae", "method.decoder_dim=96", "method.decoder_depth=1", "method.decoder_heads=3",
            "optim.name=adamw", "optim.lr=1e-4", "optim.lr_scaling=none", "optim.warmup_epochs=0",
            f"trainer.threads={args.threads}", "trainer.progress=false", "eval.final_knn=false", "trainer.precision=32",
            f"trainer.max_steps={args.steps}", "trainer.log_every=1000", f"trainer.out_dir={out}",
            "trainer.ckpt_every=1000"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=48)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not FOOTAGE.exists():
        sys.exit(f"{FOOTAGE} is missing: the benchmark decodes that real footage")
    torch.set_num_threads(args.threads)
    from selfsup.config import load_config
    from selfsup.data.loader import make_loader
    from selfsup.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "videos" / "nasa"
        folder.mkdir(parents=True)
        for i in range(args.videos):
            (folder / f"clip{i:03d}.mp4").symlink_to(FOOTAGE)
        cfg = load_config(None, overrides(folder.parent, args, Path(tmp) / "runs"))
        trainer = Trainer(cfg, run_dir=Path(tmp) / "runs" / "pipeline")
        trainer.attach_data()

        # decode only: the stream loader's batches
        loader = make_loader(trainer.dataset, args.batch, workers=args.workers, seed=0)
        it = iter(loader)
        first = next(it)  # the workers' start-up is not timed
        t0 = time.perf_counter()
        n = 0
        for _ in range(args.steps):
            n += next(it)["video"].shape[0]
        decode = n / (time.perf_counter() - t0)
        loader.close()

        # ceiling: the model on one ready batch
        method, opt = trainer.method, trainer.optimizer
        method.train()
        times = []
        for step in range(args.steps + 2):
            t = time.perf_counter()
            out = method(first)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            if step >= 2:
                times.append(time.perf_counter() - t)
        ceiling = args.batch / statistics.median(times)

        # the whole pipeline, a fresh trainer
        trainer = Trainer(cfg, run_dir=Path(tmp) / "runs" / "pipeline2")
        summary = trainer.fit()
        pipeline = summary["timings"]["clips_per_second"]
        wait = summary["timings"]["data_wait"]
    lines = [header("Video pipeline throughput: decode included, against the model-only ceiling"),
             f"VideoMAE on `video_vit_tiny` x {args.depth} blocks, clips of 16 frames every 4 at {args.size} px "
             f"(2 x 16 x 16 tubelets), batch {args.batch}, fp32, {args.threads} torch threads, {args.workers} PyAV "
             f"decoding worker(s), {args.steps} steps each, from {args.videos} links to nasa_13013.mp4 (320 x 180 "
             "H.264). torchcodec not timed: no system FFmpeg here.", "",
             "| what | clips/s | vs ceiling |", "|---|---|---|",
             f"| decode only (stream loader, no model) | {decode:.1f} | {decode / ceiling:.2f}x |",
             f"| model-only ceiling (one ready batch) | {ceiling:.1f} | 1.00x |",
             f"| whole pipeline (`Trainer.fit`, decode included) | {pipeline:.1f} | {pipeline / ceiling:.2f}x |",
             "", f"Data wait in the pipeline: {wait:.0%} of step time." if wait is not None else "",
             "On 2 cores the decoding worker and the model share the same cores; on a GPU machine the model leaves the "
             "CPU to the workers, so this ratio is a lower bound of what the pipeline keeps."]
    RESULTS.write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
