"""nanoGPT's shakespeare_char CPU recipe, run unmodified, as an anchor for a side-by-side comparison.

What it measures (the nanoGPT side):

* trains karpathy/nanoGPT's own ``train.py`` / ``model.py`` (from ``--nanogpt DIR``; the checkout is
  only read) with the README's "I only have a macbook" command::

      python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
          --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
          --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

  plus ``--always_save_checkpoint=True`` (I/O only: a checkpoint at every eval, so that the model the
  last eval saw can be re-evaluated; training and its random stream are unchanged). ``max_iters`` and
  ``lr_decay_iters`` follow ``--iters``; when ``--iters`` is not a multiple of the config's
  ``eval_interval`` (250) it is set to ``--iters`` so that a final eval is printed (recorded in the JSON);
* the data: ``../shared/data/text/tinyshakespeare.txt`` (the same 1,115,394 characters as nanoGPT's
  download) run through nanoGPT's own ``data/shakespeare_char/prepare.py`` in a temp folder (a stub
  ``requests`` module beside it guarantees no download): first 90% train, last 10% val, vocab = the
  sorted set of characters (65), uint16 ids;
* **final val loss**: train.py's last ``step N: train loss X, val loss Y`` line, i.e. ``estimate_loss``
  with ``eval_iters=20`` random batches of 12 x 64 per split (noisy). train.py cannot change
  eval_iters for the last eval only, so the checkpoint of that same step is re-evaluated here with
  200 random batches (train.py's estimate_loss, seed 1337) and over the whole val split (all
  non-overlapping 64-char windows);
* **ms/iter**: the median of the ``iter i: ... time Tms`` lines for i >= 10, leaving out the
  iterations at which an eval ran (their time includes the eval); **tokens/s** = 12 * 64 / that median.
  Threads: ``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = ``--threads`` for the train.py subprocess
  (train.py does not call ``torch.set_num_threads``; torch takes its intra-op count from OMP).

Rerun (from the repository root; ~a few minutes on 2 cores for 2000 iterations)::

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    .venv/bin/python benchmarks/nanogpt_anchor.py --nanogpt /tmp/nanoGPT [--iters 2000] [--threads 2]
        [--out benchmarks/results/nanogpt_anchor.json] [--only nanogpt]

Writes the JSON (machine, date, command, torch version, full train.py stdout tail, eval curve) and
prints a short table. The selfsup side (``run_selfsup``) trains ``configs/clm/shakespeare_char.yaml``
(the same settings) through ``selfsup pretrain`` on the same split, one job after the other.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _common import cpu_model

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "nanogpt_anchor.json"

# the README's CPU ("macbook") overrides, on top of config/train_shakespeare_char.py
README_CPU_OVERRIDES = {
    "device": "cpu", "compile": False, "eval_iters": 20, "log_interval": 1, "block_size": 64,
    "batch_size": 12, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0,
    # max_iters / lr_decay_iters: from --iters (README: 2000)
}
CONFIG_EVAL_INTERVAL = 250  # config/train_shakespeare_char.py
README_REPORTED_LOSS = 1.88  # "gets us a loss of only 1.88" (README, CPU paragraph)

STEP_RE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
ITER_RE = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")


def _cpu_times() -> dict | None:
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    except (OSError, IndexError):
        return None
    return dict(zip(["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"], map(int, f)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nanogpt_commit(src: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _check_checkout(src: Path) -> None:
    need = ["train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
            "data/shakespeare_char/prepare.py"]
    missing = [p for p in need if not (src / p).is_file()]
    if missing:
        sys.exit(f"--nanogpt {src}: not a karpathy/nanoGPT checkout (missing {', '.join(missing)}). "
                 "Get one with: git clone https://github.com/karpathy/nanoGPT")


def prepare_workdir(src: Path, text: Path, work: Path) -> dict:
    """Lay out ``work`` the way train.py expects (it reads ``data/<dataset>/`` relative to its cwd,
    and execs ``configurator.py`` from its cwd) and build the char data with nanoGPT's prepare.py."""
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy2(src / name, work / name)
    (work / "config").mkdir()
    shutil.copy2(src / "config" / "train_shakespeare_char.py", work / "config")
    data = work / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    shutil.copy2(src / "data" / "shakespeare_char" / "prepare.py", data / "prepare.py")
    shutil.copy2(text, data / "input.txt")  # prepare.py downloads only when input.txt is absent
    # prepare.py imports requests at the top; this stub (first on sys.path: the script's folder)
    # satisfies the import and makes any download attempt fail loudly
    (data / "requests.py").write_text(
        "def get(*a, **k):\n    raise RuntimeError('nanogpt_anchor: no downloads')\n")
    out = subprocess.run([sys.executable, "prepare.py"], cwd=data, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"prepare.py failed:\n{out.stdout}\n{out.stderr}")
    with open(data / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    return {"prepare_stdout": out.stdout.strip().splitlines(), "vocab_size": meta["vocab_size"],
            "train_tokens": (data / "train.bin").stat().st_size // 2,
            "val_tokens": (data / "val.bin").stat().st_size // 2}


def reevaluate(work: Path, ckpt_path: Path, threads: int, eval_iters: int = 200, seed: int = 1337) -> dict:
    """Re-evaluate a train.py checkpoint: train.py's estimate_loss with ``eval_iters`` batches, and
    the loss over every non-overlapping block_size window of the val split."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    spec = importlib.util.spec_from_file_location("nanogpt_model", work / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = mod.GPT(mod.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    cfg = ckpt["config"]
    bs, T = cfg["batch_size"], cfg["block_size"]
    data_dir = work / "data" / cfg["dataset"]
    arrays = {s: np.memmap(data_dir / f"{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val")}

    torch.manual_seed(seed)
    est = {}
    with torch.no_grad():
        for split in ("train", "val"):  # same sampling as train.py's get_batch / estimate_loss
            data = arrays[split]
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                ix = torch.randint(len(data) - T, (bs,))
                x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
                y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
                losses[k] = model(x, y)[1].item()
            est[split] = losses.mean().item()
        # whole val split: windows starting at 0, T, 2T, ... (each target predicted once)
        val = torch.from_numpy(arrays["val"].astype(np.int64))
        n = (len(val) - 1) // T
        xs, ys = val[:n * T].view(n, T), val[1:n * T + 1].view(n, T)
        tot, cnt = 0.0, 0
        for i in range(0, n, 256):
            logits, _ = model(xs[i:i + 256], ys[i:i + 256])
            tot += torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), ys[i:i + 256].reshape(-1), reduction="sum").item()
            cnt += ys[i:i + 256].numel()
    return {"iter_num": ckpt["iter_num"], "eval_iters": eval_iters, "seed": seed,
            "train_loss": est["train"], "val_loss": est["val"],
            "val_loss_full_split": tot / cnt, "val_tokens_scored": cnt}


def run_nanogpt(args) -> dict:
    """Train nanoGPT's shakespeare_char CPU recipe in a subprocess and return its numbers."""
    src = Path(args.nanogpt).resolve()
    _check_checkout(src)
    text = Path(args.text).resolve()
    if not text.is_file():
        sys.exit(f"--text {text}: no such file")

    iters = args.iters
    eval_interval = CONFIG_EVAL_INTERVAL if iters % CONFIG_EVAL_INTERVAL == 0 else iters
    overrides = dict(README_CPU_OVERRIDES, max_iters=iters, lr_decay_iters=iters)
    extra = {"always_save_checkpoint": True}
    if eval_interval != CONFIG_EVAL_INTERVAL:
        extra["eval_interval"] = eval_interval
    argv = ["train.py", "config/train_shakespeare_char.py",
            *[f"--{k}={v}" for k, v in {**overrides, **extra}.items()]]

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1")
    work = Path(tempfile.mkdtemp(prefix="nanogpt_anchor_"))
    try:
        data_info = prepare_workdir(src, text, work)
        cmd = [sys.executable, *argv]
        print(f"[nanogpt] in {work}: {' '.join(argv)}  (OMP_NUM_THREADS={args.threads})", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        train_wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"train.py exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        lines = proc.stdout.splitlines()

        evals = [{"step": int(m[1]), "train_loss": float(m[2]), "val_loss": float(m[3])}
                 for m in map(STEP_RE.match, lines) if m]
        iter_rows = [(int(m[1]), float(m[2]), float(m[3])) for m in map(ITER_RE.match, lines) if m]
        if not evals or not iter_rows:
            raise RuntimeError("could not parse train.py output:\n" + proc.stdout[-4000:])
        final = evals[-1]
        eval_steps = {e["step"] for e in evals}
        times = [ms for i, _, ms in iter_rows if i >= 10 and i not in eval_steps]
        med = statistics.median(times)
        # median per window of eval_interval iterations (same exclusions): shows slow stretches
        windows = {}
        for i, _, ms in iter_rows:
            if i >= 10 and i not in eval_steps:
                windows.setdefault(i // eval_interval * eval_interval, []).append(ms)
        tokens_per_iter = overrides["batch_size"] * overrides["block_size"]

        ckpt = work / "out-shakespeare-char" / "ckpt.pt"
        re_eval = None
        if ckpt.is_file():
            t1 = time.perf_counter()
            re_eval = reevaluate(work, ckpt, args.threads)
            re_eval["wall_s"] = round(time.perf_counter() - t1, 1)
            if re_eval["iter_num"] != final["step"]:
                re_eval["warning"] = "checkpoint is not from the final eval step"

        import torch
        return {
            "nanogpt_src": str(src),
            "nanogpt_commit": _nanogpt_commit(src),
            "nanogpt_sha256": {p: _sha256(src / p) for p in ("train.py", "model.py")},
            "text": str(text), "text_sha256": _sha256(text), **data_info,
            "command": f"OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} python {' '.join(argv)}",
            "threads": args.threads,
            "torch": torch.__version__,
            "hyperparameters": {**overrides, "eval_interval": eval_interval,
                                "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "min_lr": 1e-4,
                                "warmup_iters": 100, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1,
                                "grad_clip": 1.0, "bias": False, "decay_lr": True},
            "extra_overrides": extra,
            "final_step": final["step"],
            "final_train_loss_eval20": final["train_loss"],
            "final_val_loss_eval20": final["val_loss"],
            "reeval_final_ckpt": re_eval,
            "evals": evals,
            "training_steps_run": len(iter_rows),
            "median_ms_per_iter": med,
            "mean_ms_per_iter": statistics.fmean(times),
            "p10_p90_ms_per_iter": [statistics.quantiles(times, n=10)[0], statistics.quantiles(times, n=10)[-1]]
            if len(times) >= 10 else None,
            "timed_iters": len(times),
            "median_ms_by_window": {f"{k}-{k + eval_interval - 1}": round(statistics.median(v), 2)
                                    for k, v in sorted(windows.items())},
            "eval_iter_ms": {i: ms for i, _, ms in iter_rows if i in eval_steps},
            "iter_ms": [ms for _, _, ms in iter_rows],
            "tokens_per_iter": tokens_per_iter,
            "tokens_per_s": tokens_per_iter / (med / 1000.0),
            "train_wall_s": round(train_wall, 1),
            "readme_reported_loss": README_REPORTED_LOSS,
            "stdout_head": lines[:60],
            "stdout_tail": lines[-30:],
            "stderr_tail": proc.stderr.splitlines()[-20:],
        }
    finally:
        if args.keep:
            print(f"[nanogpt] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# the selfsup side: the same split, model and optimization through `selfsup pretrain`


def run_selfsup(args) -> dict:
    """``selfsup pretrain --config configs/clm/shakespeare_char.yaml`` (nanoGPT's settings, the same 90/10
    character split of the same file) in a subprocess with the same thread count, one metrics row per
    step; the validation loss is the run's own held-out score over the whole val split (all
    non-overlapping 64-character windows, as ``val_loss_full_split`` on the nanoGPT side)."""
    import csv
    import statistics

    out = Path(tempfile.mkdtemp(prefix="selfsup_anchor_"))
    cmd = [sys.executable, "-m", "selfsup", "pretrain", "--config", str(REPO / "configs" / "clm" / "shakespeare_char.yaml"),
           "--out", str(out), f"trainer.max_steps={args.iters}", f"trainer.threads={args.threads}",
           "trainer.log_every=1", "trainer.progress=false", "eval.final_knn=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"selfsup pretrain failed ({proc.returncode}): {proc.stderr[-2000:]}")
    run = next(out.iterdir())
    summary = json.loads((run / "summary.json").read_text())
    with (run / "metrics.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("img_s")]
    tokens_per_iter = 12 * 64
    ms = [1000.0 * tokens_per_iter / float(r["img_s"]) for r in rows if int(r["step"]) >= 10]
    lm = summary["language_model"]
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"command": " ".join(cmd), "final_step": summary["position"]["step"],
            "val_loss_full_split": lm["loss"], "val_tokens_scored": lm["tokens"], "val_accuracy": lm["accuracy"],
            "final_train_loss": summary["final_loss"], "median_ms_per_iter": round(statistics.median(ms), 2),
            "mean_ms_per_iter": 1000.0 * summary["timings"]["train_seconds"] / summary["position"]["step"],
            "tokens_per_s": tokens_per_iter / (statistics.median(ms) / 1000.0),
            "train_wall_s": round(wall, 1), "reeval_final_ckpt": {"val_loss_full_split": lm["loss"]}}


def render_md(result: dict) -> str:
    """The BENCHMARKS.md section of a side-by-side run."""
    n, o = result["nanogpt"], result["selfsup"]
    speed = o["tokens_per_s"] / n["tokens_per_s"]
    return "\n".join([
        "# Causal LM anchor: selfsup vs nanoGPT's shakespeare_char CPU recipe, side by side", "",
        f"Machine: {result['machine']['cpu']}, {n['threads']} threads, torch {result['machine']['torch']}; date: "
        f"{result['date']}; command: `python benchmarks/nanogpt_anchor.py --nanogpt DIR --iters {n['final_step']} "
        f"--threads {n['threads']}` (nanoGPT commit {n.get('nanogpt_commit', '?')[:10]}). One job after the other on an "
        "otherwise idle machine. Both train 4 layers x 4 heads x 128 wide, block 64, batch 12, "
        f"{n['final_step']} iterations, AdamW 1e-3 (betas 0.9/0.99, weight decay 0.1), 100 warm-up steps, cosine "
        "to 1e-4, clipping 1.0, no bias, no dropout, on the same 90/10 character split of tiny-shakespeare. "
        "Validation loss over the whole val split (every non-overlapping 64-character window; nanoGPT's own "
        "20-batch estimate in brackets); speed: the median step time after step 10, outside evaluations.", "",
        "| | val loss (full split) | train loss | median ms/step | mean ms/step | tokens/s (median) |",
        "|---|---|---|---|---|---|",
        f"| nanoGPT | {n['reeval_final_ckpt']['val_loss_full_split']:.4f} ({n['final_val_loss_eval20']:.4f}) | "
        f"{n['final_train_loss_eval20']:.4f} | {n['median_ms_per_iter']:.1f} | {n['mean_ms_per_iter']:.1f} | "
        f"{n['tokens_per_s']:,.0f} |",
        f"| selfsup `configs/clm/shakespeare_char.yaml` | {o['val_loss_full_split']:.4f} | {o['final_train_loss']:.4f} "
        f"(last step) | {o['median_ms_per_iter']:.1f} | {o['mean_ms_per_iter']:.1f} | {o['tokens_per_s']:,.0f} |", "",
        f"selfsup / nanoGPT tokens/s: {speed:.2f}x by the median step, "
        f"{n['mean_ms_per_iter'] / o['mean_ms_per_iter']:.2f}x by the mean. nanoGPT's README quotes a val loss of about "
        f"{README_REPORTED_LOSS} for this recipe.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", required=True,
                    help="a checkout of karpathy/nanoGPT (git clone https://github.com/karpathy/nanoGPT); only read")
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="tiny shakespeare text (default: %(default)s)")
    ap.add_argument("--iters", type=int, default=2000, help="max_iters = lr_decay_iters (README: 2000)")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL/torch threads")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output (default: %(default)s)")
    ap.add_argument("--only", choices=["nanogpt", "selfsup", "both"], default="both")
    ap.add_argument("--keep", action="store_true", help="keep the temp working folder")
    args = ap.parse_args()

    import torch
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join([sys.executable, *sys.argv]),
        "loadavg_before": os.getloadavg(),
    }
    cpu0 = _cpu_times()
    t0 = time.perf_counter()
    if args.only in ("nanogpt", "both"):
        result["nanogpt"] = run_nanogpt(args)
    if args.only in ("selfsup", "both"):
        try:
            result["selfsup"] = run_selfsup(args)
        except NotImplementedError as e:
            if args.only == "selfsup":
                raise
            result["selfsup"] = {"skipped": str(e)}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["loadavg_after"] = os.getloadavg()
    cpu1 = _cpu_times()
    if cpu0 and cpu1:  # whole machine over the run (/proc/stat): busy share and steal (hypervisor)
        d = {k: cpu1[k] - cpu0[k] for k in cpu0}
        tot = sum(d.values()) or 1
        result["machine_cpu_over_run"] = {"busy_pct": round(100 * (tot - d["idle"] - d["iowait"]) / tot, 1),
                                          "steal_pct": round(100 * d["steal"] / tot, 1)}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'side':<8} {'iters':>6} {'val loss (eval_iters=20)':>25} {'val (200)':>10} "
          f"{'val (full)':>10} {'ms/iter':>8} {'tokens/s':>9}")
    for side in ("nanogpt", "selfsup"):
        r = result.get(side)
        if not r or "skipped" in r:
            continue
        re_ = r.get("reeval_final_ckpt") or {}
        f = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"  # noqa: E731
        print(f"{side:<8} {r.get('final_step', '-'):>6} {f(r.get('final_val_loss_eval20')):>25} "
              f"{f(re_.get('val_loss')):>10} {f(re_.get('val_loss_full_split')):>10} "
              f"{r['median_ms_per_iter']:>8.2f} {r['tokens_per_s']:>9.0f}")
    if "nanogpt" in result:
        print("nanogpt median ms/iter by window:", result["nanogpt"]["median_ms_by_window"])
    if "nanogpt" in result and "selfsup" in result and "skipped" not in result["selfsup"]:
        (out.parent / "nanogpt_anchor.md").write_text(render_md(result))
    print(f"\nwall {result['wall_s']} s; load avg before {result['loadavg_before']}; "
          f"machine CPU over the run {result.get('machine_cpu_over_run')}; wrote {out}")


if __name__ == "__main__":
    main()
