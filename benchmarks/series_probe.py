"""Time-series methods against their random-init encoder: ETTh1 forecasting and UCR/UEA classification.

For each method (PatchTST, TS2Vec, TS-JEPA) and seed:

1. ETTh1 (``configs/patchtst/etth1_cpu.yaml``, ``configs/ts2vec/etth1.yaml``): pretrain on the training months, then forecast the
   test months H steps ahead with a linear head on the frozen encoder (``selfsup.eval.forecast``:
   PatchTST's linear-probing protocol, the (lr, epoch) chosen on the validation months), for the
   trained encoder, the same encoder at random init (same seed, untrained) and a linear map of the
   input window itself (NLinear);
2. UCR/UEA sets from the sktime wheel (``configs/patchtst/ucr_cpu.yaml``, ``configs/ts2vec/ucr.yaml``,
   ``data.source=ucr:<Name>``):
   pretrain on the set's training series, then probe the pooled features of its test series:
   logistic regression (L-BFGS), an RBF SVM (TS2Vec's protocol) and kNN (k = 5), trained vs random init.

Every row goes to a JSON-lines file with the machine, date and command; ``--render`` writes the
markdown section. Rerun (on a 2-core CPU about 25 minutes per PatchTST ETTh1 seed, a few minutes for
the rest):

    python benchmarks/series_probe.py --methods patchtst ts2vec ts_jepa --seeds 0 1 2
    python benchmarks/build_md.py   # refreshes BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import run_meta

ROOT = Path(__file__).resolve().parents[1]
UCR_SETS = ("GunPoint", "BasicMotions")
RECIPES = {"patchtst": {"etth1": "configs/patchtst/etth1_cpu.yaml", "ucr": "configs/patchtst/ucr_cpu.yaml"},
           "ts2vec": {"etth1": "configs/ts2vec/etth1.yaml", "ucr": "configs/ts2vec/ucr.yaml"},
           "ts_jepa": {"etth1": "configs/ts_jepa/etth1.yaml", "ucr": "configs/ts_jepa/ucr_cpu.yaml"},
           "ts_forecast": {"etth1": "configs/ts_forecast/etth1_cpu.yaml", "ucr": "configs/ts_forecast/ucr_cpu.yaml"},
           # the same method with method.target=latent, as its own row
           "ts_forecast-latent": {"etth1": "configs/ts_forecast/etth1_latent_cpu.yaml",
                                  "ucr": "configs/ts_forecast/ucr_cpu.yaml", "ucr_override": ["method.target=latent",
                                                                                            "backbone.dropout=0.0"]},
           "ts_crossvar": {"etth1": "configs/ts_crossvar/etth1_cpu.yaml", "ucr": "configs/ts_crossvar/ucr_cpu.yaml"},
           # the two-view methods on series: TS-TCC's views, TS2Vec's encoder
           "simclr-series": {"ucr": "configs/simclr/ucr_series.yaml"},
           "vicreg-series": {"ucr": "configs/vicreg/ucr_series.yaml"}}

# published numbers beside ours (ETTh1, multivariate, standardized MSE / MAE on the test months)
ANCHORS = {
    "96": {"PatchTST self-supervised, linear probing (Nie et al. 2023, Table 12)": (0.371, 0.400),
           "PatchTST self-supervised, fine-tuned (Table 12)": (0.366, 0.397),
           "PatchTST/42 supervised (Table 3)": (0.375, 0.399),
           "DLinear (Zeng et al. 2023, Table 2)": (0.375, 0.399),
           "NLinear (Zeng et al. 2023, Table 2)": (0.374, 0.394)},
    "336": {"PatchTST self-supervised, linear probing (Nie et al. 2023, Table 12)": (0.445, 0.446),
            "PatchTST self-supervised, fine-tuned (Table 12)": (0.450, 0.456),
            "PatchTST/42 supervised (Table 3)": (0.431, 0.436),
            "DLinear (Zeng et al. 2023, Table 2)": (0.439, 0.443),
            "NLinear (Zeng et al. 2023, Table 2)": (0.429, 0.427)},
}


def forecast_row(method: str, seed: int, args, out_dir: Path) -> dict:
    from selfsup.config import load_config
    from selfsup.core.build import build_method
    from selfsup.eval.forecast import forecast_probe
    from selfsup.train.trainer import Trainer

    recipe = ROOT / RECIPES[method]["etth1"]
    cfg = load_config(recipe, [f"trainer.seed={seed}", f"trainer.threads={args.threads}", "trainer.progress=false",
                               f"trainer.out_dir={out_dir}", f"trainer.run_name={method}-etth1-{seed}", "eval.final_knn=false",
                               *([f"trainer.max_steps={args.steps}"] if args.steps else []), *args.override])
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.fit()
    cfg = trainer.cfg
    row = {"method": method, "task": "etth1", "seed": seed, "steps": summary["position"]["step"], "recipe": str(recipe.relative_to(ROOT)),
           "train_seconds": round(time.perf_counter() - t0, 1), "final_loss": summary["final_loss"],
           "horizons": list(cfg.eval.forecast_horizons), "head_epochs": cfg.eval.forecast_epochs}
    horizons = tuple(cfg.eval.forecast_horizons)
    trained = forecast_probe(trainer.method, cfg, device=trainer.device, horizons=horizons,
                             epochs=cfg.eval.forecast_epochs, precision=trainer.precision)
    random_init = build_method(cfg).to(trainer.device)
    rand = forecast_probe(random_init, cfg, device=trainer.device, horizons=horizons, epochs=cfg.eval.forecast_epochs,
                          precision=trainer.precision, baseline=False)
    for h in trained["horizons"]:
        row[h] = {"trained": trained["horizons"][h]["encoder"], "random": rand["horizons"][h]["encoder"],
                  "input_linear": trained["horizons"][h]["input_linear"], "windows": trained["horizons"][h]["windows"]}
        print(f"{method} ETTh1 seed {seed} H={h}: trained MSE {row[h]['trained']['mse']:.4f}, random {row[h]['random']['mse']:.4f}, "
              f"input linear {row[h]['input_linear']['mse']:.4f}", file=sys.stderr)
    return row


def ucr_row(method: str, name: str, seed: int, args, out_dir: Path) -> dict:
    from selfsup.config import load_config
    from selfsup.core.build import build_method
    from selfsup.eval import logistic_regression, svm_probe
    from selfsup.evaluate import labeled_features, run_knn
    from selfsup.train.trainer import Trainer

    recipe = ROOT / RECIPES[method]["ucr"]
    cfg = load_config(recipe, [*RECIPES[method].get("ucr_override", []), f"data.source=ucr:{name}", f"trainer.seed={seed}", f"trainer.threads={args.threads}",
                               "trainer.progress=false", f"trainer.out_dir={out_dir}", f"trainer.run_name={method}-{name}-{seed}",
                               "eval.final_knn=false", *([f"trainer.max_steps={args.ucr_steps}"] if args.ucr_steps else []),
                               *args.override])
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.fit()
    cfg = trainer.cfg
    row = {"method": method, "task": f"ucr:{name}", "seed": seed, "steps": summary["position"]["step"],
           "recipe": str(recipe.relative_to(ROOT)), "train_seconds": round(time.perf_counter() - t0, 1),
           "final_loss": summary["final_loss"]}
    random_init = build_method(cfg).to(trainer.device)
    for tag, model in (("trained", trainer.method), ("random", random_init)):
        feats = labeled_features(model.eval(), cfg, device=trainer.device)
        row[tag] = {"linear_top1": logistic_regression(*feats[:4])["top1"], "svm_top1": svm_probe(*feats[:4])["top1"],
                    "knn_top1": run_knn(feats, cfg)[f"k{cfg.eval.knn_k[0]}"]["top1"],
                    "train": int(feats[0].shape[0]), "test": int(feats[2].shape[0])}
    print(f"{method} {name} seed {seed}: trained linear {row['trained']['linear_top1']:.1f} SVM {row['trained']['svm_top1']:.1f} "
          f"kNN {row['trained']['knn_top1']:.1f}; random linear {row['random']['linear_top1']:.1f} SVM "
          f"{row['random']['svm_top1']:.1f} kNN {row['random']['knn_top1']:.1f}", file=sys.stderr)
    return row


def _ms(values: list[float], digits: int) -> str:
    mean = statistics.mean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def render(rows: list[dict]) -> str:
    first = rows[0]
    out = ["# Time-series methods vs their random-init encoder: ETTh1 forecasting, UCR/UEA classification", "",
           f"Machine: {first['machine']}; date: {first['date']} (torch {first['torch']}); commands: "
           + ", ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows)) + ".", ""]
    ett = [r for r in rows if r["task"] == "etth1"]
    if ett:
        out += ["**ETTh1 forecasting.** Each method pretrains its recipe on the 12 training months (PatchTST: "
                "`configs/patchtst/etth1_cpu.yaml`, the paper's encoder, context 512, patch 12, 40% masked, 400 steps "
                "of 64 windows where the paper trains 100 epochs; TS2Vec: `configs/ts2vec/etth1.yaml`, 200 steps of 16 "
                "windows of 512, its official iteration count; forecasting pretext: `configs/ts_forecast/etth1_cpu.yaml`, "
                "windows of 336 in patches of 16, the last 96 steps predicted from the first 240 by PatchTST's encoder "
                "and flatten head, 400 steps of 64 windows, and `ts_forecast-latent` the same predicting the EMA "
                "encoder's tokens of the future patches, `etth1_latent_cpu.yaml`; the probe reads the last 240 steps, "
                "the context the pretext forecast from; cross-variable prediction: `configs/ts_crossvar/etth1_cpu.yaml`, "
                "the same encoder and windows, 2 of the 7 channels held out and reconstructed). Then a linear head on the frozen encoder forecasts H "
                "steps (PatchTST's linear probing: the flattened patch tokens of each channel, de-normalized per window; "
                "TS2Vec: the last step's representation to all 7 x H values), trained with Adam at lr 1e-4 and 1e-3, "
                "the (lr, epoch) with the best validation MSE scored on every window of the 4 test months "
                "(standardized MSE / MAE). Random init: the same encoder, same seed, untrained, same probe. Input "
                "linear: the same head on the instance-normalized input window (NLinear). Mean ± standard deviation "
                "over the seeds; gain = random - trained MSE (positive: pretraining helped).", "",
                "| method | seeds | steps | H | trained MSE | random init MSE | gain | input linear MSE | trained MAE |",
                "|---|---|---|---|---|---|---|---|---|"]
        for method in dict.fromkeys(r["method"] for r in ett):
            rs = [r for r in ett if r["method"] == method]
            for h in (str(x) for x in rs[0]["horizons"]):
                t = [r[h]["trained"]["mse"] for r in rs]
                z = [r[h]["random"]["mse"] for r in rs]
                gain = [a - c for a, c in zip(z, t)]
                out.append(f"| `{method}` | {len(rs)} | {rs[0]['steps']} | {h} | {_ms(t, 4)} | {_ms(z, 4)} | "
                           f"{statistics.mean(gain):+.4f} (min {min(gain):+.4f}) | "
                           f"{_ms([r[h]['input_linear']['mse'] for r in rs], 4)} | "
                           f"{_ms([r[h]['trained']['mae'] for r in rs], 4)} |")
        out += ["", "Published ETTh1 numbers (same split and normalization; MSE / MAE):", "",
                "| H | model (source) | MSE | MAE |", "|---|---|---|---|"]
        for h, anchors in ANCHORS.items():
            for what, (mse, mae) in anchors.items():
                out.append(f"| {h} | {what} | {mse:.3f} | {mae:.3f} |")
        out.append("")
    ucr = [r for r in rows if r["task"].startswith("ucr:")]
    if ucr:
        out += ["**UCR/UEA classification.** Each method pretrains on a set's training series only (PatchTST: "
                "`configs/patchtst/ucr_cpu.yaml`, 300 steps of 16 series, patches of 8; TS-JEPA: `configs/ts_jepa/ucr_cpu.yaml`, "
                "the same encoder and steps, 70% of the patches hidden; forecasting pretext: `configs/ts_forecast/ucr_cpu.yaml`, "
                "the same encoder and steps, each series' last quarter predicted from the rest (values; "
                "`ts_forecast-latent`: the EMA encoder's tokens); cross-variable prediction: `configs/ts_crossvar/ucr_cpu.yaml`, the "
                "same encoder and steps, 2 of the 6 channels held out (multivariate sets only); SimCLR and VICReg "
                "on series: `configs/{simclr,vicreg}/ucr_series.yaml`, TS-TCC's weak and strong views and TS2Vec's "
                "encoder, 300 steps of 16; TS2Vec: `configs/ts2vec/ucr.yaml`, "
                "its official 200 iterations of 16), then three probes on the pooled "
                "features (the PatchTST encoder: each channel's patch tokens averaged, channels side by side; TS2Vec's "
                "encoder: the timestamps' representations max-pooled), fit on the training series and scored on the official "
                "test series: logistic regression (L-BFGS, standardized features), an RBF SVM with C cross-validated "
                "(TS2Vec's protocol, `selfsup eval svm`) and kNN (k = 5); top-1 %, mean ± standard deviation over the "
                "seeds. Random init: the same encoder, same seed and same initialization, untrained.", "",
                "| method | set (train / test) | seeds | probe | trained | random init | gain |",
                "|---|---|---|---|---|---|---|"]
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in ucr:
            groups.setdefault((r["method"], r["task"]), []).append(r)
        for (method, task), rs in groups.items():
            for key, what in (("linear_top1", "logistic regression"), ("svm_top1", "RBF SVM"), ("knn_top1", "kNN")):
                if key not in rs[0]["trained"]:  # rows from before the SVM probe
                    continue
                t = [r["trained"][key] for r in rs]
                z = [r["random"][key] for r in rs]
                gain = [a - b for a, b in zip(t, z)]
                out.append(f"| `{method}` | {task[4:]} ({rs[0]['trained']['train']} / {rs[0]['trained']['test']}) | "
                           f"{len(rs)} | {what} | {_ms(t, 1)} | {_ms(z, 1)} | {statistics.mean(gain):+.1f} "
                           f"(min {min(gain):+.1f}) |")
        out += ["", "No published accuracy is printed beside these: TS2Vec's per-set UCR/UEA accuracies are in its "
                "paper's appendix tables, which no primary copy available here showed (secondary copies disagree); "
                "the RBF SVM rows follow its protocol (`fit_svm`)."]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=["etth1", *UCR_SETS])
    p.add_argument("--steps", type=int, default=0, help="ETTh1 pretraining steps (0: the recipe's)")
    p.add_argument("--ucr-steps", type=int, default=0, help="UCR pretraining steps (0: the recipe's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "series_probe.jsonl"))
    p.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for every run")
    p.add_argument("--render", action="store_true", help="only rewrite benchmarks/results/series_probe.md from --out")
    args = p.parse_args()
    md = ROOT / "benchmarks" / "results" / "series_probe.md"
    if not args.render:
        torch.set_num_threads(args.threads)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = run_meta("series_probe.py")
        with tempfile.TemporaryDirectory() as tmp:
            for method in args.methods:
                for task in args.tasks:
                    for seed in args.seeds:
                        row = (forecast_row(method, seed, args, Path(tmp)) if task == "etth1"
                               else ucr_row(method, task, seed, args, Path(tmp)))
                        with out.open("a") as fh:
                            fh.write(json.dumps({**row, **meta}) + "\n")
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    md.write_text(render(rows))
    print(f"wrote {md}", file=sys.stderr)


if __name__ == "__main__":
    main()
