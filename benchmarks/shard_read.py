"""Reading shards: selfsup's indexed reader against webdataset's and litdata's own pipelines.

The question behind ``data.mode: shards`` (data/shards.py): which maintained library should read
a large image set packed into shards? Each reader decodes the same images to uint8 tensors in
DataLoader worker processes, shuffled, in batches, with nothing else running; the model is left
out, so this is the most each path can feed. The images are ``data_path.py``'s folder: CIFAR-10
training images UPSCALED to 224 x 224 JPEGs (quality 90), so each decodes like a small photo.

* **selfsup**: ``selfsup data shard`` (WebDataset tars + index.npz), read by ``StreamLoader``
  over ``ShardStream`` (one ``os.pread`` per sample, shard-local shuffled order);
* **webdataset**: the same tars read by ``webdataset.WebDataset`` as a stream (shard shuffle,
  a 1,000-sample shuffle buffer, batches built in the workers);
* **litdata**: ``litdata.optimize`` writes the same JPEG bytes into its chunk format (64 MB
  chunks), read by ``StreamingDataset(shuffle=True)`` + ``StreamingDataLoader``.

Each reader runs in a fresh process: images/s over one epoch after the first batch, and peak
memory (main RSS + workers' summed PSS). litdata is not a dependency of selfsup: run the script
with a Python that has it (``pip install litdata``), or pass ``--readers selfsup webdataset``.

    PYTHONPATH=src python benchmarks/shard_read.py [--images 20000] [--workers 2] [--batch 256]

Writes ``benchmarks/results/shard_read.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, peak_rss_mib  # noqa: E402
from data_path import ChildMemory, build_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "shard_read.md"
READERS = ("selfsup", "webdataset", "litdata")


def _decode(data: bytes):
    import torch
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def prepare(folder: Path, work: Path, readers: list[str]) -> dict[str, Path]:
    """Write the shard sets the readers need (reused when complete)."""
    from selfsup.data.shards import INDEX_NAME, write_shards

    places = {"shards": work / f"{folder.name}-shards", "litdata": work / f"{folder.name}-litdata"}
    if not (places["shards"] / INDEX_NAME).exists():
        write_shards(str(folder), places["shards"])
    if "litdata" in readers and not (places["litdata"] / ".complete").exists():
        from litdata import optimize

        from selfsup.data.sources import open_folder_stream

        stream = open_folder_stream(str(folder))
        items = list(zip(stream.paths(), stream.labels.tolist()))
        optimize(fn=_litdata_item, inputs=items, output_dir=str(places["litdata"]), chunk_bytes="64MB",
                 num_workers=2)
        (places["litdata"] / ".complete").touch()
    return places


def _litdata_item(item: tuple[str, int]) -> dict:
    path, label = item
    return {"image": Path(path).read_bytes(), "label": label}


def _litdata_decode(sample: dict) -> dict:
    return {"images": _decode(sample["image"]), "labels": sample["label"]}


def _wds_decode(sample: dict) -> tuple:
    return _decode(sample["jpg"]), int(sample["cls"])


def _stack(samples: list) -> dict:
    import torch

    return {"images": torch.stack([s[0] for s in samples]), "labels": torch.tensor([s[1] for s in samples])}


def loader_for(reader: str, places: dict[str, Path], args: argparse.Namespace):
    """An iterable of batches {"images": uint8 B x 3 x 224 x 224, ...} for one epoch."""
    if reader == "selfsup":
        from selfsup.data.loader import StreamLoader
        from selfsup.data.shards import open_shards

        return StreamLoader(open_shards(str(places["shards"])), args.batch, workers=args.workers, seed=0)
    if reader == "webdataset":
        import webdataset as wds
        from torch.utils.data import DataLoader

        urls = [str(p) for p in sorted(places["shards"].glob("*.tar"))]
        pipeline = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
                    .shuffle(1000).map(_wds_decode).batched(args.batch, collation_fn=_stack, partial=False))
        return DataLoader(pipeline, batch_size=None, num_workers=args.workers, prefetch_factor=4)
    from litdata import StreamingDataLoader, StreamingDataset

    dataset = StreamingDataset(str(places["litdata"]), shuffle=True, seed=0, transform=_litdata_decode,
                               drop_last=True)
    return StreamingDataLoader(dataset, batch_size=args.batch, num_workers=args.workers, prefetch_factor=4)


def measure(reader: str, places: dict[str, Path], args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    with ChildMemory() as children:
        loader = loader_for(reader, places, args)
        batches = images = 0
        t0 = time.perf_counter()
        first = None
        for batch in loader:
            if first is None:
                first = time.perf_counter()
            else:
                images += len(batch["images"])
            batches += 1
        seconds = time.perf_counter() - (first or t0)
    return {"reader": reader, "images_s": images / seconds if seconds else None, "batches": batches,
            "first_batch_s": (first or t0) - t0, "rss_mib": peak_rss_mib(),
            "workers_pss_mib": children.peak_mib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--readers", nargs="+", default=list(READERS), choices=READERS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "selfsup-data-path")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = build_folder(args.work, args.images)
    places = prepare(folder, args.work, args.readers)
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, places, args)), flush=True)
        return
    rows = []
    for reader in args.readers:
        flags = [f"--images={args.images}", f"--workers={args.workers}", f"--batch={args.batch}", f"--work={args.work}"]
        proc = subprocess.run([sys.executable, __file__, "--one", reader, *flags], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{reader} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    lines = [header("Reading shards: selfsup's indexed reader vs webdataset and litdata"),
             f"{args.images} CIFAR-10 images upscaled to 224-px JPEGs; each reader decodes them to uint8 in "
             f"{args.workers} DataLoader workers, shuffled, batch {args.batch}, one epoch, no model.", "",
             "| reader | images/s | vs selfsup | first batch s | peak MiB: main RSS / workers PSS |",
             "|---|---|---|---|---|"]
    base = next((r["images_s"] for r in rows if r["reader"] == "selfsup"), None)
    for r in rows:
        ratio = f"{r['images_s'] / base:.2f}x" if base else ""
        lines.append(f"| {r['reader']} | {r['images_s']:.0f} | {ratio} | {r['first_batch_s']:.1f} | "
                     f"{r['rss_mib']:.0f} / {r['workers_pss_mib']:.0f} |")
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
