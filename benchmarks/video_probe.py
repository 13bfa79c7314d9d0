"""Video methods against their random-init encoder on the embedded moving-CIFAR clips.

For each method (VideoMAE, V-JEPA, V-JEPA 2) and seed: pretrain the method's CPU recipe
(``configs/<method>/embedded_cpu.yaml``) on the 2,000 training clips of the embedded set (8 frames of 32 x 32:
a 16-pixel CIFAR object moving 1 or 2 px a frame in one of 8 directions over a blurred CIFAR background), then
probe the frozen encoder on the 512 test clips for two labels: the direction of motion (8 classes: what only
motion tells) and the moving object's CIFAR class (10 classes: appearance). Probes, each fit on the training
clips: logistic regression (L-BFGS) and kNN (k = 5, 20) on the mean-pooled tokens, and V-JEPA's attentive probe
(a learned query cross-attending to the tokens, then a linear layer; ``selfsup.eval.attentive``). The same encoder
at random init (same seed, untrained) is probed beside it, and so are the pixels themselves (each frame
average-pooled to 8 x 8, all frames side by side: what the input already tells a linear probe).

With ``--plan`` each V-JEPA 2 seed's encoder then carries a V-JEPA 2-AC world model
(``configs/vjepa2_ac/embedded_cpu.yaml``: the action is the object's motion per frame), and its planner (the
cross-entropy method from frame 0 toward frame 2 of each test clip) is scored by whether the planned motion has the
clip's direction (chance 12.5%), beside the same world model trained on the V-JEPA 2 encoder at random init.

Every row goes to a JSON-lines file with the machine, date and command; ``--render`` writes the markdown
section. The table in BENCHMARKS.md came from (2-core CPU, 310 steps, probes included: about 5 minutes per
VideoMAE seed, 6 per V-JEPA seed, 9 per V-JEPA 2 seed with its world model and planner; the attentive probe is
left out there, it costs about a minute per fit):

    python benchmarks/video_probe.py --methods videomae vjepa vjepa2 --seeds 0 1 2 --steps 310 --plan \
        --plan-clips 64 --plan-steps 60 --attentive-labels
    python benchmarks/build_md.py   # refreshes BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import run_meta

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {name: f"configs/{name}/embedded_cpu.yaml" for name in ("videomae", "vjepa", "vjepa2")}
LABELS = ("direction", "object")


def probe(model, cfg, device, label: str, attentive: bool, seed: int, lrs: tuple[float, ...]) -> dict:
    from selfsup.eval import logistic_regression
    from selfsup.eval.attentive import attentive_probe
    from selfsup.evaluate import embed_dataset, labeled_features, load_feature_split, run_knn

    cfg = replace(cfg, data=replace(cfg.data, label_column=label))
    feats = labeled_features(model.eval(), cfg, device=device)
    knn = run_knn(feats, cfg)
    row = {"linear_top1": logistic_regression(*feats[:4])["top1"],
           **{f"knn{k}_top1": knn[f"k{k}"]["top1"] for k in cfg.eval.knn_k},
           "train": int(feats[0].shape[0]), "test": int(feats[2].shape[0])}
    if attentive:
        tokens = []
        for split in (cfg.data.train_split, cfg.data.test_split):
            tokens.extend(embed_dataset(model, load_feature_split(cfg, split), device=device,
                                        batch_size=cfg.data.eval_batch_size, tokens=True))
        result = attentive_probe(*tokens, lrs=lrs, seed=seed, device=device)
        row["attentive_top1"], row["attentive_lr"] = result["top1"], result["lr"]
    return row


class PixelBaseline(torch.nn.Module):
    """The feature-free baseline: every frame of the evaluation clip average-pooled to 8 x 8, frames side by side."""

    def __init__(self, method) -> None:
        super().__init__()
        self.method = method
        self.eval_size = method.eval_size

    def embed(self, batch):
        x = self.method.preprocess(batch)  # (B, 3, T, S, S)
        b, c, t, s, _ = x.shape
        return F.adaptive_avg_pool2d(x.reshape(b, c * t, s, s), 8).flatten(1).float()


def row_for(method: str, seed: int, args, out_dir: Path) -> dict:
    from selfsup.config import load_config
    from selfsup.core.build import build_method
    from selfsup.train.trainer import Trainer

    recipe = ROOT / RECIPES[method]
    cfg = load_config(recipe, [f"trainer.seed={seed}", f"trainer.threads={args.threads}", "trainer.progress=false",
                               f"trainer.out_dir={out_dir}", f"trainer.run_name={method}-{seed}", "eval.final_knn=false",
                               *([f"trainer.max_steps={args.steps}"] if args.steps else []), *args.override])
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.fit()
    cfg = trainer.cfg
    row = {"method": method, "seed": seed, "steps": summary["position"]["step"], "recipe": str(recipe.relative_to(ROOT)),
           "train_seconds": round(time.perf_counter() - t0, 1), "final_loss": summary["final_loss"],
           "knn_k": list(cfg.eval.knn_k), "overrides": list(args.override), "attentive_lrs": list(args.attentive_lrs)}
    torch.manual_seed(seed)
    random_init = build_method(cfg).to(trainer.device)
    for tag, model, attentive in (("trained", trainer.method, True), ("random", random_init, True),
                                  ("pixels", PixelBaseline(random_init), False)):
        row[tag] = {label: probe(model, cfg, trainer.device, label, attentive and label in args.attentive_labels, seed,
                                 tuple(args.attentive_lrs)) for label in LABELS}
    if args.plan and method == "vjepa2":
        row["plan"] = {tag: plan_row(model, seed, args, out_dir / f"{method}-{seed}-ac-{tag}")
                       for tag, model in (("trained", trainer.method), ("random", random_init))}
        print(f"{method} seed {seed} planning success: trained encoder {row['plan']['trained']['success']:.1f}, random "
              f"{row['plan']['random']['success']:.1f}", file=sys.stderr)
    for label in LABELS:
        t, r, s = (row[k][label] for k in ("trained", "random", "pixels"))
        print(f"{method} seed {seed} {label}: trained linear {t['linear_top1']:.1f} kNN {t['knn5_top1']:.1f} attentive "
              f"{t.get('attentive_top1', float('nan')):.1f}; random linear {r['linear_top1']:.1f} kNN {r['knn5_top1']:.1f} "
              f"attentive {r.get('attentive_top1', float('nan')):.1f}; pixels linear {s['linear_top1']:.1f}", file=sys.stderr)
    return row


def plan_row(encoder_method, seed: int, args, run_dir: Path) -> dict:
    """V-JEPA 2-AC trained on ``encoder_method``'s encoder (frozen), then its planner on the test clips."""
    from selfsup.config import load_config
    from selfsup.eval.planning import plan_directions
    from selfsup.evaluate import load_feature_split
    from selfsup.train.trainer import Trainer

    cfg = load_config(ROOT / "configs/vjepa2_ac/embedded_cpu.yaml",
                      [f"trainer.seed={seed}", f"trainer.threads={args.threads}", "trainer.progress=false",
                       f"trainer.out_dir={run_dir.parent}", f"trainer.run_name={run_dir.name}",
                       *([f"trainer.max_steps={args.plan_steps}"] if args.plan_steps else [])])
    trainer = Trainer(cfg)
    trainer.method.backbone.load_state_dict(encoder_method.encoder.state_dict())  # the V-JEPA 2 run's encoder, frozen
    summary = trainer.fit()
    result = plan_directions(trainer.method, load_feature_split(trainer.cfg, "test"), horizon=2, seed=seed,
                             limit=args.plan_clips, device=trainer.device)
    return {**result, "steps": summary["position"]["step"], "final_loss": summary["final_loss"]}


def _attentive(rows: list[dict]) -> bool:
    return any("attentive_top1" in r["trained"][label] for r in rows for label in LABELS)


def _lrs(rows: list[dict]) -> str:
    chosen = sorted({r[t][label]["attentive_lr"] for r in rows for t in ("trained", "random") for label in LABELS
                     if "attentive_lr" in r[t][label]})
    lrs = sorted({float(x) for r in rows for x in r.get("attentive_lrs", [])})
    if len(lrs) > 1:
        return f"chosen among {', '.join(f'{x:g}' for x in lrs)} on a held-out tenth of the training clips"
    return f"{', '.join(f'{x:g}' for x in chosen)}, fixed"


def _ms(values: list[float], digits: int = 1) -> str:
    mean = statistics.mean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def render(rows: list[dict]) -> str:
    first = rows[0]
    out = ["# Video methods vs their random-init encoder: embedded moving-CIFAR clips, direction and object", "",
           f"Machine: {first['machine']}; date: {first['date']} (torch {first['torch']}); commands: "
           + ", ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows)) + ".", "",
           "Each method pretrains its CPU recipe (`configs/<method>/embedded_cpu.yaml`: 8-frame 32 x 32 clips in "
           "2 x 8 x 8 tubelets, a 6-block 192-wide video ViT) for "
           + ", ".join(sorted({f"{r['steps']}" for r in rows})) + " steps of 64 clips (the recipes' 20 epochs of the 2,000 "
           "training clips are 620), then "
           "the frozen encoder is probed on the 512 test clips for the direction of motion (8 classes, chance 12.5%) "
           "and the moving object's CIFAR class (10 classes, chance 10%): logistic regression (L-BFGS) and kNN on the "
           "mean of the tokens" + (f", and V-JEPA's attentive probe on the tokens (20 epochs, AdamW; its learning rate "
           f"{_lrs(rows)})" if _attentive(rows) else "")
           + ", each fit on the training clips. Random init: the same encoder, same seed, untrained. Pixels: each "
           "frame average-pooled to 8 x 8, all frames side by side, under logistic regression and kNN. Top-1 %, mean ± standard deviation "
           "over the seeds; gain = trained - random init.", "",
           "| method | seeds | steps | label | probe | trained | random init | gain | pixels |",
           "|---|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        probes = ([("linear_top1", "logistic regression")] + [(f"knn{k}_top1", f"kNN k={k}") for k in rs[0]["knn_k"]]
                  + [("attentive_top1", "attentive probe")])
        for label in LABELS:
            for key, what in probes:
                if any(key not in r["trained"][label] for r in rs):
                    continue
                t = [r["trained"][label][key] for r in rs]
                z = [r["random"][label][key] for r in rs]
                s = [r["pixels"][label].get(key) for r in rs]
                gain = [a - b for a, b in zip(t, z)]
                pixels = _ms(s) if None not in s else "-"
                out.append(f"| `{method}` | {len(rs)} | {rs[0]['steps']} | {label} | {what} | {_ms(t)} | {_ms(z)} | "
                           f"{statistics.mean(gain):+.1f} (min {min(gain):+.1f}) | {pixels} |")
    planned = [r for r in rows if "plan" in r]
    if planned:
        t = [r["plan"]["trained"]["success"] for r in planned]
        z = [r["plan"]["random"]["success"] for r in planned]
        et = [r["plan"]["trained"]["mean_action_error_px"] for r in planned]
        ez = [r["plan"]["random"]["mean_action_error_px"] for r in planned]
        p = planned[0]["plan"]["trained"]
        out += ["", "V-JEPA 2-AC on each V-JEPA 2 seed's frozen encoder (`configs/vjepa2_ac/embedded_cpu.yaml`, "
                f"{planned[0]['plan']['trained']['steps']} steps; the action is the object's motion per frame), then its "
                f"planner from frame 0 toward frame {p['horizon']} of {p['clips']} test clips (cross-entropy method, "
                f"{p['samples']} samples, {p['iterations']} rounds, top {p['top_k']}, actions within ±{p['max_norm']} px): "
                "success = the planned mean motion names the clip's direction (chance 12.5%). Random init: the same "
                "world model trained on the V-JEPA 2 encoder at random init.", "",
                "| world model on | seeds | planning success % | mean action error (px / frame) |", "|---|---|---|---|",
                f"| V-JEPA 2 encoder, trained | {len(planned)} | {_ms(t)} | {_ms(et, 2)} |",
                f"| V-JEPA 2 encoder, random init | {len(planned)} | {_ms(z)} | {_ms(ez, 2)} |"]
    out += ["", "Published numbers, for scale (other data, other models, fine-tuned or probed at paper scale; not "
            "comparable to the rows above): VideoMAE ViT-B fine-tuned, Kinetics-400 80.9, Something-Something v2 70.6, "
            "UCF101 from scratch 90.8 (Tong et al. 2022); V-JEPA ViT-L/16 attentive probe, K400 80.8, SSv2 69.5 "
            "(Bardes et al. 2024); V-JEPA 2 ViT-g/384 attentive probe, SSv2 77.3 (Assran et al. 2025). The recipes "
            "`configs/videomae/k400.yaml`, `configs/vjepa/vitl16.yaml` and `configs/vjepa2/vitl16.yaml` are those runs' "
            "settings; Kinetics and SSv2 cannot be downloaded here."]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=0, help="pretraining steps (0: the recipe's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "video_probe.jsonl"))
    p.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for every run")
    p.add_argument("--plan", action="store_true", help="also train V-JEPA 2-AC on each V-JEPA 2 seed and score its planner")
    p.add_argument("--plan-clips", type=int, default=128, help="test clips the planner is scored on")
    p.add_argument("--plan-steps", type=int, default=0, help="world-model training steps (0: the recipe's)")
    p.add_argument("--attentive-labels", nargs="*", default=list(LABELS), choices=list(LABELS),
                   help="labels the attentive probe is fit for (it costs about a minute a fit on 2 cores)")
    p.add_argument("--attentive-lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3],
                   help="the attentive probe's learning rates, chosen on a held-out tenth of the training clips")
    p.add_argument("--render", action="store_true", help="only rewrite benchmarks/results/video_probe.md from --out")
    args = p.parse_args()
    md = ROOT / "benchmarks" / "results" / "video_probe.md"
    if not args.render:
        torch.set_num_threads(args.threads)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = run_meta("video_probe.py")
        with tempfile.TemporaryDirectory() as tmp:
            for method in args.methods:
                for seed in args.seeds:
                    row = row_for(method, seed, args, Path(tmp))
                    with out.open("a") as fh:
                        fh.write(json.dumps({**row, **meta}) + "\n")
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    md.write_text(render(rows))
    print(f"wrote {md}", file=sys.stderr)


if __name__ == "__main__":
    main()
