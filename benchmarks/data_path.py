"""The data path at 224 px: the memory, streaming and shard paths against the model on ready tensors.

Builds ImageFolders of 224 x 224 JPEGs from CIFAR-10 (``../shared/data/cifar10-jpg.tar.gz``: the
32-px training images, UPSCALED to 224 with bicubic resampling and saved at JPEG quality 90, so
each file decodes like a small ImageNet photo although it holds only CIFAR's detail) with 5,000,
20,000 and 50,000 images (balanced over the 10 classes) under ``--work`` (default /tmp), and the
same folders as shards (``selfsup data shard``). For each size, backbone and ``data.mode`` it
trains SimCLR (``configs/simclr/imagenet.yaml``: 224-px views with blur; the batch from the flags)
for ``--steps`` steps and records:

* **images/s**: training images per second of wall time over the steps after the trainer's data-wait
  warm-up, the wait for batches included (``DataWait``: the time the loop waits in ``next(it)``
  plus the step itself);
* **ready**: the same trainer's step on one uint8 batch already on the device, repeated: the most the
  data path could give (augmentation is still in the step, as in every mode). It depends on the
  model and batch only, so it is measured in the first configuration of each backbone and used
  for the rest;
* **data_wait**: the share of step time spent waiting for batches (what summary.json reports);
* **peak memory**: the training process's peak resident set (RSS), and the peak of its loader workers'
  proportional set sizes (PSS) summed, sampled every 0.2 s (a forked worker's RSS would count the
  parent's pages it shares); each configuration runs in a fresh process, so peaks do not carry over;
* **setup s**: building the Trainer: listing the folder (stream), or decoding and stacking the whole
  set (memory: the first run also writes the decoded cache under ``--work``, which later runs read).

Usage (from the repository root; sizes over what the machine's RAM allows in memory mode are
skipped for that mode):

    PYTHONPATH=src python benchmarks/data_path.py [--sizes 5000 20000 50000] [--modes memory stream shards]
        [--backbones resnet50 vit_small] [--batch 32] [--steps 8] [--workers N] [--device auto]

Writes ``benchmarks/results/data_path.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, peak_rss_mib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
RESULTS = ROOT / "benchmarks" / "results" / "data_path.md"
SIDE = 224
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ------------------------------------------------------------------------------------ the folders


def build_folder(work: Path, count: int) -> Path:
    """``work/cifar224-<count>/train/<class>/*.jpg``: the first count/10 training images of each
    class, upscaled to 224 x 224. Reused when it is already complete."""
    folder = work / f"cifar224-{count}"
    done = folder / ".complete"
    if done.exists():
        return folder
    per_class = count // len(CLASSES)
    jobs: list[tuple[bytes, str]] = []
    taken = dict.fromkeys(CLASSES, 0)
    with tarfile.open(ARCHIVE) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) != 3 or parts[0] != "train" or not member.isfile() or taken[parts[1]] >= per_class:
                continue
            taken[parts[1]] += 1
            jobs.append((tar.extractfile(member).read(), str(folder / "train" / parts[1] / parts[2])))
            if len(jobs) == per_class * len(CLASSES):
                break
    for name in CLASSES:
        (folder / "train" / name).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_upscale, jobs, chunksize=256))
    done.touch()
    return folder


def build_shards(folder: Path) -> Path:
    """``folder`` written as shards beside it (``<folder>-shards``); reused when complete."""
    from selfsup.data.shards import INDEX_NAME, write_shards

    out = folder.parent / f"{folder.name}-shards"
    if not (out / INDEX_NAME).exists():
        write_shards(str(folder), out)
    return out


def _upscale(job: tuple[bytes, str]) -> None:
    import io

    from PIL import Image

    data, path = job
    with Image.open(io.BytesIO(data)) as image:
        image.convert("RGB").resize((SIDE, SIDE), Image.BICUBIC).save(path, quality=90)


# ------------------------------------------------------------------------------------ one measurement


def measure(folder: Path, mode: str, backbone: str, args: argparse.Namespace) -> dict:
    """Train ``args.steps`` steps in ``mode`` on ``folder`` (in this process) and time it."""
    import torch

    from selfsup.config import load_config
    from selfsup.train.trainer import Trainer

    overrides = [f"data.source={folder}", f"data.mode={mode}", f"data.batch_size={args.batch}",
                 "data.decode_size=224", "data.memory_budget_gib=1000", f"backbone.name={backbone}",
                 f"trainer.device={args.device}", f"trainer.max_steps={args.steps}", "trainer.progress=false",
                 "trainer.epochs=1000", "eval.final_knn=false", "eval.online_every=0", "trainer.log_every=1000"]
    if args.workers is not None:
        overrides.append(f"data.workers={args.workers}")
    cfg = load_config(ROOT / "configs" / "simclr" / "imagenet.yaml", overrides)
    with tempfile.TemporaryDirectory() as tmp, ChildMemory() as children:
        t0 = time.perf_counter()
        trainer = Trainer(cfg, run_dir=Path(tmp) / "run")
        setup = time.perf_counter() - t0
        trainer.fit()
        wait = trainer.data_wait
        steps = wait.steps - wait.WARMUP
        images_s = args.batch * steps / wait.total if wait.total else None
        ready_s = None if args.skip_ready else ready_images_per_second(trainer, args)
        workers = getattr(trainer.loader, "workers", 0)
        trainer.loader.close()
    return {"images": len(trainer.dataset), "mode": mode, "backbone": backbone, "workers": workers, "images_s": images_s,
            "ready_s": ready_s, "data_wait": wait.share, "setup_s": setup, "device": str(trainer.device),
            "precision": trainer.precision, "rss_mib": peak_rss_mib(),
            "workers_pss_mib": children.peak_mib, "threads": torch.get_num_threads()}


class ChildMemory:
    """Peak of the summed PSS of this process's children (the loader workers), polled in a thread."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s, self.peak_mib = every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ChildMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_mib = max(self.peak_mib, sum(_pss_mib(pid) for pid in _children()))


def _children() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:  # the thread ended
            continue
    return pids


def _pss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:  # the child exited
        pass
    return 0.0


def ready_images_per_second(trainer, args: argparse.Namespace) -> float:
    """The trainer's own step on one batch that is already on the device, ``args.steps`` times."""
    import torch

    trainer.loader.set_epoch(0)
    batch = next(iter(trainer.loader))
    batch = {k: v.to(trainer.device) for k, v in batch.items() if torch.is_tensor(v)}
    trainer.train_step([batch])  # warm-up
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step([batch])
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch * args.steps / (time.perf_counter() - t0)


def fits_in_memory(count: int) -> bool:
    """Whether the decoded set (plus its decode-time copy) fits in half of this machine's RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 2 * count * 3 * SIDE * SIDE < ram / 2


# ------------------------------------------------------------------------------------ the report


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [header("Data path at 224 px: memory vs streaming vs shards vs ready tensors"),
             f"SimCLR (configs/simclr/imagenet.yaml views), batch {args.batch}, "
             f"{args.steps} steps per configuration; images are CIFAR-10 upscaled to 224 px JPEGs "
             "(decode cost of a 224-px JPEG, CIFAR's detail). images/s includes the wait for data; ready is the "
             "same step on a batch already on the device, measured once per backbone (in its first configuration, after "
             "that run's steps); 'of ready' above 100% is the spread of few-step CPU timings, not a gain. Peak RSS "
             "is of the training process; the workers' PSS is summed over the loader workers.", "",
             "| backbone | images | mode | workers | images/s | ready images/s | of ready | data_wait "
             "| peak MiB: main RSS / workers PSS | setup s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['backbone']} | {r['images']} | {r['mode']} | | skipped: {r['skipped']} | | | | | |")
            continue
        wait = "n/a" if r["data_wait"] is None else f"{r['data_wait']:.2%}"
        speed = "n/a" if r["images_s"] is None else _rate(r["images_s"])
        share = "n/a" if r["images_s"] is None else f"{r['images_s'] / r['ready_s']:.0%}"
        lines.append(f"| {r['backbone']} | {r['images']} | {r['mode']} | {r['workers']} | {speed} | "
                     f"{_rate(r['ready_s'])} | {share} | {wait} | {r['rss_mib']:.0f} / {r['workers_pss_mib']:.0f} | "
                     f"{r['setup_s']:.1f} |")
    device = next((r for r in rows if "device" in r), {})
    lines += ["", f"Device {device.get('device', '?')}, precision {device.get('precision', '?')}."]
    return "\n".join(lines) + "\n"


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--modes", nargs="+", default=["memory", "stream", "shards"], choices=["memory", "stream", "shards"])
    ap.add_argument("--backbones", nargs="+", default=["resnet50", "vit_small"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="data.workers (default: the library's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "selfsup-data-path")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--one", nargs=3, metavar=("FOLDER", "MODE", "BACKBONE"), help=argparse.SUPPRESS)
    ap.add_argument("--skip-ready", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--previous", type=Path, help="rows already measured (the JSON lines an earlier run printed): "
                                                   "kept in the table, their configurations not run again")
    args = ap.parse_args()
    if args.one:  # a child: one configuration in a fresh process, result as one JSON line
        print("RESULT " + json.dumps(measure(Path(args.one[0]), args.one[1], args.one[2], args)), flush=True)
        return
    os.environ.setdefault("SELFSUP_CACHE_DIR", str(args.work / "cache"))
    rows = [json.loads(line) for line in args.previous.read_text().splitlines()
            if line.startswith("{")] if args.previous else []
    done = {(r["images"], r["mode"], r.get("backbone")) for r in rows}
    for count in args.sizes:
        if all((count, mode, backbone) in done for mode in args.modes for backbone in args.backbones):
            continue
        folder = build_folder(args.work, count)
        shards = build_shards(folder) if "shards" in args.modes else None
        for backbone in args.backbones:
            for mode in args.modes:
                if (count, mode, backbone) in done:
                    continue
                if mode == "memory" and not fits_in_memory(count):
                    rows.append({"images": count, "mode": mode, "backbone": backbone,
                                 "skipped": "over half of this machine's RAM"})
                    continue
                ready = next((r["ready_s"] for r in rows if r.get("backbone") == backbone and r.get("ready_s")), None)
                rows.append(run_child(shards if mode == "shards" else folder, mode, backbone, args, skip_ready=bool(ready)))
                if ready:  # the ceiling depends on the model and batch only: measured once per backbone
                    rows[-1]["ready_s"] = ready
                print(json.dumps(rows[-1]), flush=True)
    text = report(rows, args)
    args.out.write_text(text)
    print(text)


def run_child(folder: Path, mode: str, backbone: str, args: argparse.Namespace, skip_ready: bool = False) -> dict:
    flags = [f"--batch={args.batch}", f"--steps={args.steps}", f"--device={args.device}",
             *([f"--workers={args.workers}"] if args.workers is not None else []), *(["--skip-ready"] if skip_ready else [])]
    proc = subprocess.run([sys.executable, __file__, "--one", str(folder), mode, backbone, *flags], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{mode} on {folder} failed:\n{proc.stderr[-3000:]}")


if __name__ == "__main__":
    main()
