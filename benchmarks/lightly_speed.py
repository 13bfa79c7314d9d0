"""SimCLR training throughput, selfsup vs lightly, on the same model, side by side.

lightly (https://github.com/lightly-ai/lightly) is the SSL library most users would otherwise
reach for. Its documented SimCLR recipe is a user-written loop: a torch ``DataLoader`` whose
workers apply ``SimCLRTransform`` (torchvision transforms on one PIL image at a time), lightly's
``SimCLRProjectionHead``, ``NTXentLoss`` and ``LARS``. selfsup trains the same thing with
``Trainer.fit``: batched augmentation on the device, its own head, loss and LARS.

Both sides get the same backbone module (built by selfsup's config, so the narrow demo ResNet
can be compared too), the same batch, views, augmentation settings (crop scale, colour jitter,
grayscale, flip, no blur, CIFAR normalization), temperature, precision (the recipe's, bf16
autocast on a CPU with AVX-512 bf16) and channels_last memory format. What differs is the data
pipeline and the loop around the model. Images come from the embedded CIFAR-10 subset, held
decoded in memory on both sides (lightly's dataset hands out PIL images, as torchvision's
CIFAR10 does). lightly runs with 0 and with ``--workers`` DataLoader workers.

Contenders alternate in rounds of steps after one warm-up round; each number is the median over
rounds of images per second (wall clock, data loading included; selfsup's checkpoint writes are
switched off for the measurement). Each round also times the data pipelines alone (lightly's
DataLoader with 0 workers, selfsup's ``make_views``), which is where the two differ.

    pip install lightly   # not a selfsup dependency
    PYTHONPATH=src python benchmarks/lightly_speed.py [--cases demo recipe] [--rounds 5]

Prints the table and writes ``benchmarks/results/lightly_speed.md``.
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
from torch import nn  # noqa: E402

from selfsup.config import load_config  # noqa: E402
from selfsup.data import load_dataset  # noqa: E402
from selfsup.core.build import build_method  # noqa: E402
from selfsup.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lightly_speed.md"
# case -> (recipe, overrides, steps per round)
CASES = {
    "demo": (ROOT / "src" / "selfsup" / "configs" / "default.yaml", [], 8),  # `make demo`'s job: width 16, batch 128
    "recipe": (ROOT / "configs" / "simclr" / "cifar10.yaml", ["data.batch_size=128"], 2),  # full ResNet-18
}


def selfsup_trainer(case: str, run_dir: Path, data) -> Trainer:
    recipe, overrides, _ = CASES[case]
    cfg = load_config(recipe, ["data.source=embedded", "trainer.progress=false", "eval.online_every=0",
                               "eval.final_knn=false", "trainer.epochs=100", *overrides])
    trainer = Trainer(cfg, run_dir=run_dir, data=data)
    trainer.save = lambda *a, **k: None  # time the steps, not checkpoint writes
    return trainer


class PILDataset(torch.utils.data.Dataset):
    """The decoded uint8 images, handed out one PIL image at a time through ``transform``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i].permute(1, 2, 0).numpy())), int(self.labels[i])


class LightlyLoop:
    """lightly's SimCLR example loop, with selfsup's backbone, precision and memory format."""

    def __init__(self, trainer: Trainer, data, workers: int) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
        from lightly.transforms import SimCLRTransform
        from lightly.utils.lars import LARS

        cfg = trainer.cfg
        v, m = cfg.augment.views[0], cfg.method
        transform = SimCLRTransform(
            input_size=v.size, cj_prob=v.jitter_p, cj_strength=1.0, cj_bright=v.brightness,
            cj_contrast=v.contrast, cj_sat=v.saturation, cj_hue=v.hue, min_scale=v.crop_scale[0],
            random_gray_scale=v.grayscale_p, gaussian_blur=v.blur_p, hf_prob=v.hflip_p,
            normalize={"mean": list(v.mean), "std": list(v.std)})
        self.backbone = build_method(cfg).backbone  # a fresh copy of the same architecture
        self.head = SimCLRProjectionHead(self.backbone.out_dim, m.proj_hidden_dim, m.proj_dim)
        self.model = nn.Sequential(self.backbone, self.head).to(memory_format=torch.channels_last)
        self.criterion = NTXentLoss(temperature=m.temperature)
        self.optimizer = LARS(self.model.parameters(), lr=trainer.lr, momentum=0.9,
                              weight_decay=cfg.optim.weight_decay)
        self.loader = torch.utils.data.DataLoader(
            PILDataset(data.images, data.labels, transform), batch_size=cfg.data.batch_size, shuffle=True,
            drop_last=True, num_workers=workers, persistent_workers=workers > 0)
        self.autocast = trainer._autocast
        self.it = iter(self.loader)

    def batch(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def step(self) -> None:
        (x0, x1), _ = self.batch()
        x0 = x0.contiguous(memory_format=torch.channels_last)
        x1 = x1.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.criterion(self.model(x0), self.model(x1))
        loss.float().backward()
        self.optimizer.step()


def measure(case: str, rounds: int, workers: int, data) -> dict:
    steps = CASES[case][2]
    with tempfile.TemporaryDirectory() as tmp:
        ours = selfsup_trainer(case, Path(tmp), data)
        batch = ours.cfg.data.batch_size
        theirs = {f"lightly, {w} workers": LightlyLoop(ours, data, w) for w in sorted({0, workers})}
        speeds: dict[str, list[float]] = {"selfsup": [], **{k: [] for k in theirs}}
        data_ms: dict[str, list[float]] = {"lightly": [], "selfsup": []}
        for r in range(rounds + 1):  # round 0 warms up every contender (and starts the workers)
            t0 = time.perf_counter()
            ours.fit(until_step=ours.step + steps)
            took = {"selfsup": time.perf_counter() - t0}
            for name, loop in theirs.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    loop.step()
                took[name] = time.perf_counter() - t0
            # the data pipelines alone: lightly's DataLoader batch (0 workers), selfsup's make_views
            loop0 = theirs["lightly, 0 workers"]
            t0 = time.perf_counter()
            for _ in range(steps):
                loop0.batch()
            pipe = {"lightly": 1e3 * (time.perf_counter() - t0) / steps}
            images = next(iter(ours.loader))["images"]
            with torch.no_grad():
                t0 = time.perf_counter()
                for _ in range(steps):
                    ours.method.make_views(images)
            pipe["selfsup"] = 1e3 * (time.perf_counter() - t0) / steps
            if r:
                for name, sec in took.items():
                    speeds[name].append(batch * steps / sec)
                for name, ms in pipe.items():
                    data_ms[name].append(ms)
            print(f"  {case} round {r}: " + ", ".join(f"{k} {batch * steps / v:.0f} img/s" for k, v in took.items()),
                  flush=True)
        info = {"case": case, "backbone": f"{ours.cfg.backbone.name} width {ours.cfg.backbone.width}",
                "batch": batch, "precision": ours.precision}
        del theirs  # stops the workers
    return {**info, "speeds": {k: statistics.median(v) for k, v in speeds.items()},
            "data_ms": {k: statistics.median(v) for k, v in data_ms.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    try:
        import lightly
    except ImportError:
        sys.exit("this benchmark compares against lightly: pip install lightly")
    data = load_dataset("embedded", "train")
    load = os.getloadavg()
    rows = [measure(case, args.rounds, args.workers, data) for case in args.cases]
    load_after = os.getloadavg()
    names = list(rows[0]["speeds"])
    lines = [header("SimCLR throughput: selfsup vs lightly, same model"),
             f"- lightly {lightly.__version__}; torch threads: {torch.get_num_threads()}; {args.rounds} rounds after one "
             "warm-up round, medians of images/s (wall clock, data loading included)",
             f"- load average (1/5/15 min) before / after: {' / '.join(f'{x:.2f}' for x in (*load, *load_after))}",
             "",
             "The same backbone module, batch, two 32-px views, augmentation settings, temperature, precision and",
             "channels_last on both sides; lightly's loop is its SimCLR example (DataLoader + SimCLRTransform on",
             "PIL images, SimCLRProjectionHead, NTXentLoss, LARS). demo: `make demo`'s job (ResNet-18 at width",
             "16); recipe: configs/simclr/cifar10.yaml's ResNet-18 at batch 128.",
             "",
             "Data ms/batch: the data pipeline alone, in the same rounds: lightly's DataLoader with 0 workers",
             "(PIL images from memory, transformed one at a time) and selfsup's `make_views` on a uint8 batch.",
             "",
             "| case | backbone | batch | precision | " + " | ".join(f"{n} img/s" for n in names)
             + " | " + " | ".join(f"selfsup / {n}" for n in names[1:])
             + " | lightly data ms/batch | selfsup data ms/batch |",
             "|---|---|---:|---|" + "---:|" * (2 * len(names) + 1)]
    for r in rows:
        s, d = r["speeds"], r["data_ms"]
        lines.append(f"| {r['case']} | {r['backbone']} | {r['batch']} | {r['precision']} | "
                     + " | ".join(f"{s[n]:.0f}" for n in names) + " | "
                     + " | ".join(f"{s['selfsup'] / s[n]:.2f}x" for n in names[1:])
                     + f" | {d['lightly']:.0f} | {d['selfsup']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
