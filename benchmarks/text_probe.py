"""Text methods against their random-init encoder: held-out token scores and probes on real labeled sets.

For each method (its CPU recipe, configs/<method>/shakespeare_cpu.yaml) and seed:

1. pretrain on unlabeled text: the sentences of SST-2's train split plus WikiText-2's valid and test
   splits (../shared/data/text; the issue's corpus), with SST-2's dev sentences held out;
2. score held-out tokens (masked-token accuracy / loss for MLM, span-target loss for T5; data2vec
   has no token predictions) on the held-out sentences;
3. embed two labeled sets with the frozen encoder (mean over tokens) and probe them: SST-2 (bank /
   training set: its train split, 60,614 phrases; test: its 872-sentence test split) and AG News
   (dev 10,000 / test 7,600): logistic regression (L-BFGS) and kNN (k = 20);
4. with ``--finetune-epochs N``: fine-tune the whole encoder plus a linear head on SST-2's train
   phrases (the first ``--finetune-train`` of them, in a seeded random order) with
   ``selfsup.eval.finetune`` (BERT's recipe: AdamW 1e-4, 10% linear warm-up, linear decay, dropout
   0.1, batch 32) and score its 872 test sentences;
5. the same probes with the same encoder at random init (the same seed, untrained).

Every row goes to a JSON-lines file with the machine, date and command. Rerun:

    python benchmarks/text_probe.py --methods mlm t5 data2vec_text --seeds 0 1 2 --steps 300
    python benchmarks/build_md.py   # refreshes BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from _common import run_meta

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text"
PROBES = {"sst2": ("train", "test"), "agnews": ("dev", "test")}
PROBE_TOKENS = 64  # probe texts are cut to their first 64 tokens (SST-2 phrases average 18; AG News ~50)


def build_corpus(out: Path) -> Path:
    """train.txt (SST-2 train sentences, WikiText-2 valid + test) and valid.txt (SST-2 dev sentences)."""
    out.mkdir(parents=True, exist_ok=True)

    def sentences(path: Path) -> list[str]:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
        return [r[0] for r in rows[1:] if r]

    train = sentences(TEXT / "sst2" / "train.tsv")
    wiki = [(TEXT / "wikitext-2" / f"{s}.txt").read_text() for s in ("valid", "test")]
    (out / "train.txt").write_text("\n".join(train) + "\n" + "".join(wiki))
    (out / "valid.txt").write_text("\n".join(sentences(TEXT / "sst2" / "dev.tsv")) + "\n")
    return out


def probe(method, cfg, name: str, device) -> dict:
    """Logistic regression and kNN on one labeled set, from frozen mean-pooled features."""
    from selfsup.eval import logistic_regression
    from selfsup.evaluate import labeled_features, run_knn

    train_split, test_split = PROBES[name]
    pcfg = replace(cfg, data=replace(cfg.data, source=str(TEXT / name), seq_len=PROBE_TOKENS), eval=replace(cfg.eval, knn_k=[20]))
    feats = labeled_features(method, pcfg, device=device, train_split=train_split, test_split=test_split)
    linear = logistic_regression(*feats[:4])
    return {"linear_top1": linear["top1"], "knn_top1": run_knn(feats, pcfg)["k20"]["top1"],
            "train": int(feats[0].shape[0]), "test": int(feats[2].shape[0])}


def finetune_sst2(method, cfg, args, seed: int, device) -> dict:
    """The whole encoder fine-tuned on SST-2 (BERT's recipe), scored on its test sentences."""
    from selfsup.eval.finetune import finetune
    from selfsup.evaluate import load_feature_split

    pcfg = replace(cfg, data=replace(cfg.data, source=str(TEXT / "sst2"), seq_len=PROBE_TOKENS))
    train, test = load_feature_split(pcfg, "train"), load_feature_split(pcfg, "test")
    if args.finetune_train and args.finetune_train < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:args.finetune_train]
        train = train.subset(keep.sort().values, "sst2-train-subset")
    res = finetune(method, train, test, epochs=args.finetune_epochs, device=device, seed=seed, progress=False)
    return {"top1": res["last_top1"], "train": len(train), "epochs": args.finetune_epochs, "recipe": res["recipe"]}


def run_one(method_name: str, seed: int, args, corpus: Path, out_dir: Path) -> dict:
    from selfsup.config import load_config
    from selfsup.core.build import build_method
    from selfsup.evaluate import language_model_scores
    from selfsup.train.trainer import Trainer

    recipe = ROOT / "configs" / method_name / "shakespeare_cpu.yaml"
    overrides = [f"data.source={corpus}", "data.train_split=train", "data.test_split=valid", f"trainer.seed={seed}",
                 f"trainer.max_steps={args.steps}", f"trainer.threads={args.threads}", "trainer.progress=false",
                 f"trainer.out_dir={out_dir}", "eval.final_knn=false", *args.override]
    cfg = load_config(recipe, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.fit()
    train_s = time.perf_counter() - t0
    device = trainer.device
    cfg = trainer.cfg
    row = {"method": method_name, "seed": seed, "steps": summary["position"]["step"], "recipe": str(recipe.relative_to(ROOT)),
           "tokens_per_second": summary["timings"].get("tokens_per_second"), "train_seconds": round(train_s, 1),
           "final_loss": summary["final_loss"], "vocab": cfg.backbone.vocab_size}
    random_init = build_method(cfg).to(device).eval()  # same seed, same architecture, untrained
    for tag, model in (("trained", trainer.method.eval()), ("random", random_init)):
        if getattr(model, "language_model", False):
            lm = language_model_scores(model, cfg, device=device)
            row[f"{tag}_heldout"] = {k: lm[k] for k in ("loss", "perplexity", "accuracy", "tokens")}
        for name in PROBES:
            row[f"{tag}_{name}"] = probe(model, cfg, name, device)
        if args.finetune_epochs:
            row[f"{tag}_finetune_sst2"] = finetune_sst2(model, cfg, args, seed, device)
        print(f"{method_name} seed {seed} {tag}: " + ", ".join(
            f"{name} linear {row[f'{tag}_{name}']['linear_top1']:.1f} kNN {row[f'{tag}_{name}']['knn_top1']:.1f}"
            for name in PROBES), file=sys.stderr)
    return row


def render(rows: list[dict]) -> str:
    """The BENCHMARKS.md section: per method, each probe's mean over seeds, trained vs random init."""
    import statistics

    def ms(values: list[float]) -> str:
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    first = rows[0]
    out = ["# Text methods vs their random-init encoder: SST-2 and AG News probes, held-out tokens", "",
           f"Machine: {first['machine']}; date: {first['date']}; command: `{first['command']}` "
           f"(torch {first['torch']}). Each method trains its CPU recipe (`configs/<method>/shakespeare_cpu.yaml`: "
           "text_tiny, 128 wide, 4 blocks; blocks of 128 tokens, batch 32, AdamW 1e-3) for the steps below on the "
           "sentences of SST-2's train split plus WikiText-2's valid and test splits (SST-2's dev sentences held "
           "out), then the frozen encoder's mean-pooled features are probed: logistic regression (L-BFGS, "
           "standardized features) and kNN (k = 20), trained on SST-2's 60,614 train phrases / AG News' 10,000 dev "
           "texts and scored on SST-2's 872 test sentences / AG News' 7,600 test texts, each cut to its first 64 tokens. Random init: the same "
           "encoder, same seed, untrained. Mean ± standard deviation over the seeds; gain = trained - random.", "",
           "| method | seeds | steps | probe | trained | random init | gain |", "|---|---|---|---|---|---|---|"]
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    def gain_row(method: str, rs: list[dict], label: str, field: str, key: str) -> str:
        """One table row: ``rs[*]["trained_<field>"][key]`` against ``random_<field>``, seed by seed."""
        t = [r[f"trained_{field}"][key] for r in rs]
        z = [r[f"random_{field}"][key] for r in rs]
        gain = [a - b for a, b in zip(t, z)]
        return (f"| `{method}` | {len(rs)} | {rs[0]['steps']} | {label} | {ms(t)} | {ms(z)} | "
                f"{statistics.mean(gain):+.1f} (min {min(gain):+.1f}) |")

    for method, rs in by_method.items():
        for probe_name, label in (("sst2", "SST-2"), ("agnews", "AG News")):
            for key, what in (("linear_top1", "linear"), ("knn_top1", "kNN")):
                out.append(gain_row(method, rs, f"{label} {what}", probe_name, key))
        if "trained_finetune_sst2" in rs[0]:
            ft = rs[0]["trained_finetune_sst2"]
            label = f"SST-2 fine-tuned ({ft['epochs']} epoch(s), {ft['train']:,} phrases)"
            out.append(gain_row(method, rs, label, "finetune_sst2", "top1"))
        if "trained_heldout" in rs[0]:
            t = [r["trained_heldout"]["accuracy"] for r in rs]
            z = [r["random_heldout"]["accuracy"] for r in rs]
            tl = [r["trained_heldout"]["loss"] for r in rs]
            out.append(f"| `{method}` | {len(rs)} | {rs[0]['steps']} | held-out token accuracy (loss {statistics.mean(tl):.2f} "
                       f"nats) | {ms(t)} | {ms(z)} | {statistics.mean(t) - statistics.mean(z):+.1f} |")
    speeds = {m: statistics.mean(r["tokens_per_second"] for r in rs) for m, rs in by_method.items()}
    out += ["", "Training speed on this CPU (tokens/s, mean over seeds): " +
            ", ".join(f"`{m}` {v:,.0f}" for m, v in speeds.items()) + "."]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["mlm", "t5", "data2vec_text"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "text_probe.jsonl"))
    p.add_argument("--finetune-epochs", type=int, default=0, help="also fine-tune on SST-2 for this many epochs")
    p.add_argument("--finetune-train", type=int, default=0, help="SST-2 train phrases to fine-tune on (0: all)")
    p.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for every run")
    p.add_argument("--render", action="store_true", help="only rewrite benchmarks/results/text_probe.md from --out")
    args = p.parse_args()
    if args.render:
        rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
        (ROOT / "benchmarks" / "results" / "text_probe.md").write_text(render(rows))
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = run_meta("text_probe.py")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(Path(tmp) / "corpus")
        for method_name in args.methods:
            for seed in args.seeds:
                row = {**run_one(method_name, seed, args, corpus, Path(tmp) / "runs"), **meta}
                with out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
