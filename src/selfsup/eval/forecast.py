"""Forecasting with a frozen encoder: PatchTST's linear-probing protocol (Nie et al. 2023, sec. 4.2,
Table 4), on any series method.

For each horizon H, every context window of ``data.seq_len`` steps of the series' train / val /
test split (chronological, ``selfsup.data.series``) is encoded once by the frozen encoder
(``SeriesMethod.forecast_features``). PatchTST: each channel's patch tokens flattened (N * D values,
from the instance-normalized window), and a linear head shared by the channels (the official
``PredictionHead``, ``individual=False``; dropout ``head_dropout`` before it) maps them to the H
next values in the window's normalized space, which are then de-normalized with the window's own
mean and std (RevIN's ``denorm``). TS2Vec: the window's last timestamp representation, and a linear
head maps it to all C x H values at once (TS2Vec's own protocol fits a ridge regression there). The head is trained with Adam on the mean squared error against
the standardized targets, for ``epochs`` epochs at each learning rate of ``lrs``; the (rate, epoch)
with the lowest validation MSE is kept and scored on the test split: MSE and MAE over every
(window, channel, step), the numbers the forecasting tables print.

``finetune_forecast`` is PatchTST's other protocol, fine-tuning: the same head trained with the encoder
(the head alone first, then everything), ``selfsup eval forecast --finetune``.

The same protocol on the normalized input window itself (a linear map from the L values to the H
next ones, with the same de-normalization: NLinear, Zeng et al. 2023) is reported beside it as
``input_linear``: what a linear model gets with no encoder at all. Unlike the official script we
score every test window (its test loader drops the last incomplete batch).
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

DEFAULT_HORIZONS = (96, 192, 336, 720)
DEFAULT_LRS = (1e-4, 1e-3)


@torch.no_grad()
def window_features(method: Any, windows: Any, *, device: torch.device, batch_size: int = 256,
                    precision: str = "32", desc: str = "features") -> tuple[Tensor, Tensor, Tensor]:
    """(features (n, C, F), mean (n, C, 1), std (n, C, 1)) of every window, in order, on CPU."""
    autocast = nullcontext()
    if precision in ("bf16-mixed", "16-mixed"):
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
    was_training = method.training
    method.eval()
    feats, means, stds = [], [], []
    starts = range(0, len(windows), batch_size)
    bar = tqdm(starts, desc=desc, leave=False, disable=len(starts) < 5 or not sys.stderr.isatty())
    try:
        with autocast:
            for i in bar:
                x = windows.gather(torch.arange(i, min(i + batch_size, len(windows))))["series"].to(device)
                f, mean, std = method.forecast_features(x)
                feats.append(f.float().cpu())
                means.append(mean.float().cpu())
                stds.append(std.float().cpu())
    finally:
        method.train(was_training)
    return torch.cat(feats), torch.cat(means), torch.cat(stds)


def input_features(windows: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The ``input_linear`` baseline's features: each window's channels, instance-normalized."""
    from selfsup.backbones.series import instance_norm

    x = windows.gather(torch.arange(len(windows)))["series"]
    normed, mean, std = instance_norm(x)
    return normed, mean, std


def targets(windows: Any) -> Tensor:
    return windows.gather(torch.arange(len(windows)))["target"]


def _predict(head: nn.Module, feats: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(n, C, H) forecasts, de-normalized: a channel-wise head maps (n, C, F) to (n, C, H); a joint
    head maps (n, F) to all C x H values at once."""
    out = head(feats)
    if feats.dim() == 2:
        out = out.view(len(feats), std.shape[1], -1)
    return out * std + mean


def _scores(head: nn.Module, feats: Tensor, mean: Tensor, std: Tensor, target: Tensor,
            batch_size: int = 1024) -> tuple[float, float]:
    """(MSE, MAE) of the head's de-normalized forecasts over every (window, channel, step)."""
    se = ae = 0.0
    head.eval()
    with torch.no_grad():
        for i in range(0, len(feats), batch_size):
            part = slice(i, i + batch_size)
            err = _predict(head, feats[part], mean[part], std[part]) - target[part]
            se += float(err.pow(2).sum())
            ae += float(err.abs().sum())
    n = target.numel()
    return se / n, ae / n


def fit_head(train: tuple[Tensor, ...], val: tuple[Tensor, ...], test: tuple[Tensor, ...], horizon: int, *,
             epochs: int = 20, lrs: tuple[float, ...] = DEFAULT_LRS, batch_size: int = 64,
             head_dropout: float = 0.2, seed: int = 0, desc: str = "head") -> dict:
    """Train the shared linear head on (features, mean, std, target) splits; keep the (lr, epoch)
    with the best validation MSE and score it on the test split."""
    dim = train[0].shape[-1]
    outputs = horizon if train[0].dim() == 3 else horizon * train[3].shape[1]  # per channel, or all at once
    best: dict = {"val_mse": math.inf}
    n = len(train[0])
    for lr in lrs:
        torch.manual_seed(seed)
        head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(dim, outputs))
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for epoch in tqdm(range(epochs), desc=f"{desc} lr {lr:g}", leave=False, disable=not sys.stderr.isatty()):
            head.train()
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                idx = order[i:i + batch_size]
                feats, mean, std, target = (t[idx] for t in train)
                loss = F.mse_loss(_predict(head, feats, mean, std), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            val_mse, val_mae = _scores(head, *val)
            if val_mse < best["val_mse"]:
                test_mse, test_mae = _scores(head, *test)
                best = {"mse": test_mse, "mae": test_mae, "val_mse": val_mse, "val_mae": val_mae, "lr": lr,
                        "epoch": epoch + 1, "head": copy.deepcopy(head).eval()}
    return best


def forecast_probe(method: Any, cfg: Any, *, device: torch.device, source: str | None = None,
                   horizons: tuple[int, ...] = (96,), epochs: int = 20, lrs: tuple[float, ...] = DEFAULT_LRS,
                   precision: str = "32", baseline: bool = True, plot: Path | None = None) -> dict:
    """Test MSE / MAE per horizon of a linear head on the frozen encoder (see the module docstring),
    and of the same head on the input window (``input_linear``) when ``baseline``. ``plot``: a PNG
    of one test window's last channel, its context, the truth and both forecasts at the longest
    horizon (needs matplotlib; skipped without it)."""
    from selfsup.data.series import forecast_windows

    src = source or cfg.data.source
    seq_len, head_dropout = cfg.data.seq_len, 0.2
    shortest = min(horizons)
    # features of the shortest horizon's windows; a longer horizon's windows are a prefix of them
    base = {s: forecast_windows(src, s, seq_len, shortest) for s in ("train", "val", "test")}
    feats = {s: window_features(method, w, device=device, batch_size=cfg.data.eval_batch_size, precision=precision,
                                desc=f"{s} features") for s, w in base.items()}
    raw = {s: input_features(w) for s, w in base.items()} if baseline else {}
    result: dict = {"protocol": "forecast", "seq_len": seq_len, "data": base["train"].name.split(" ")[0],
                    "channels": base["train"].channels, "epochs": epochs, "lrs": list(lrs), "horizons": {}}
    for h in sorted(horizons):
        windows = {s: forecast_windows(src, s, seq_len, h) for s in base}
        y = {s: targets(w) for s, w in windows.items()}
        split = {s: tuple(t[: len(windows[s])] for t in feats[s]) + (y[s],) for s in base}
        row = {"windows": {s: len(w) for s, w in windows.items()},
               "encoder": fit_head(split["train"], split["val"], split["test"], h, epochs=epochs, lrs=lrs,
                                   head_dropout=head_dropout, seed=cfg.trainer.seed, desc=f"H={h} head")}
        if baseline:
            split = {s: tuple(t[: len(windows[s])] for t in raw[s]) + (y[s],) for s in base}
            row["input_linear"] = fit_head(split["train"], split["val"], split["test"], h, epochs=epochs, lrs=lrs,
                                           head_dropout=0.0, seed=cfg.trainer.seed, desc=f"H={h} input linear")
        heads = {k: row[k].pop("head") for k in ("encoder", "input_linear") if k in row}
        result["horizons"][str(h)] = row
    if plot is not None:
        result["plot"] = plot_forecast(plot, windows["test"], feats["test"], raw.get("test"), heads, result["data"])
    return result


def _split_tensors(windows: Any) -> tuple[Tensor, Tensor]:
    """(inputs (n, C, L), targets (n, C, H)) of every window of a split."""
    batch = windows.gather(torch.arange(len(windows)))
    return batch["series"], batch["target"]


def finetune_forecast(method: Any, cfg: Any, *, device: torch.device, source: str | None = None, horizon: int = 96,
                      freeze_epochs: int = 10, epochs: int = 20, lr: float = 1e-4, head_dropout: float = 0.2,
                      batch_size: int | None = None, precision: str = "32") -> dict:
    """Test MSE / MAE at ``horizon`` of the encoder fine-tuned with a linear forecasting head: PatchTST's
    fine-tuning protocol (Nie et al. 2023, Table 4 "fine-tuning"; official ``patchtst_finetune.py`` with
    ``Learner.fine_tune``): the head alone for ``freeze_epochs`` (10) with the encoder frozen, one-cycle
    Adam up to ``lr``; then everything for ``epochs`` (20), one-cycle up to ``lr / 2`` (30% warm-up each,
    torch's ``OneCycleLR``). The head is the linear probe's (dropout then Linear on the encoder's
    ``forecast_features``, de-normalized per window). The weights of the epoch with the lowest validation
    MSE are scored on the test split (the official ``SaveModelCB`` on the validation loss). ``method`` is
    left as it was (a copy is trained)."""
    from selfsup.data.series import forecast_windows

    src, seq_len = source or cfg.data.source, cfg.data.seq_len
    splits = {s: _split_tensors(forecast_windows(src, s, seq_len, horizon)) for s in ("train", "val", "test")}
    model = copy.deepcopy(method).to(device)
    torch.manual_seed(cfg.trainer.seed)
    with torch.no_grad():
        probe, _, _ = model.eval().forecast_features(splits["train"][0][:2].to(device))
    outputs = horizon if probe.dim() == 3 else horizon * splits["train"][0].shape[1]
    head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(probe.shape[-1], outputs)).to(device)
    bs = batch_size or cfg.data.batch_size
    autocast = nullcontext()
    if precision in ("bf16-mixed", "16-mixed"):
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)

    def predict(x: Tensor) -> Tensor:
        with autocast:
            feats, mean, std = model.forecast_features(x)
        return _predict(head, feats.float(), mean.float(), std.float())

    def score(split: str) -> tuple[float, float]:
        x, y = splits[split]
        model.eval()
        head.eval()
        se = ae = 0.0
        with torch.no_grad():
            for i in range(0, len(x), cfg.data.eval_batch_size):
                err = predict(x[i:i + cfg.data.eval_batch_size].to(device)) - y[i:i + cfg.data.eval_batch_size].to(device)
                se += float(err.pow(2).sum())
                ae += float(err.abs().sum())
        return se / y.numel(), ae / y.numel()

    x_train, y_train = splits["train"]
    n = len(x_train)
    gen = torch.Generator().manual_seed(cfg.trainer.seed)
    best: dict = {"val_mse": math.inf}
    for phase, n_epochs, peak in (("head", freeze_epochs, lr), ("all", epochs, lr / 2)):
        if n_epochs < 1:
            continue
        model.requires_grad_(phase == "all")
        params = list(head.parameters()) + ([p for p in model.parameters() if p.requires_grad] if phase == "all" else [])
        opt = torch.optim.Adam(params, lr=peak)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=n_epochs * math.ceil(n / bs),
                                                    pct_start=0.3)
        for epoch in tqdm(range(n_epochs), desc=f"fine-tune ({phase})", leave=False, disable=not sys.stderr.isatty()):
            model.train(phase == "all")
            head.train()
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, bs):
                idx = order[i:i + bs]
                loss = F.mse_loss(predict(x_train[idx].to(device)), y_train[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            val_mse, val_mae = score("val")
            if val_mse < best["val_mse"]:
                test_mse, test_mae = score("test")
                best = {"mse": test_mse, "mae": test_mae, "val_mse": val_mse, "val_mae": val_mae, "phase": phase,
                        "epoch": epoch + 1}
    model.requires_grad_(True)
    return {**best, "lr": lr, "freeze_epochs": freeze_epochs, "epochs": epochs,
            "windows": {s: len(t[0]) for s, t in splits.items()}}


def plot_forecast(path: Path, windows: Any, feats: tuple[Tensor, ...], raw: tuple[Tensor, ...] | None,
                  heads: dict, name: str) -> str | None:
    """The middle test window's last channel: the end of its context, the truth and each head's
    forecast, in standardized units. Returns the path written, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    i = len(windows) // 2
    sample = windows.gather(torch.tensor([i]))
    context, truth = sample["series"][0, -1], sample["target"][0, -1]
    h = len(truth)
    shown = context[-min(len(context), 2 * h):]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    x_ctx = torch.arange(-len(shown), 0)
    x_fut = torch.arange(0, h)
    ax.plot(x_ctx, shown, color="0.35", linewidth=1.2, label="context")
    ax.plot(x_fut, truth, color="black", linewidth=1.4, label="truth")
    for key, color, what in (("encoder", "tab:blue", "linear head on the frozen encoder"),
                             ("input_linear", "tab:orange", "linear head on the input window")):
        src = feats if key == "encoder" else raw
        if key not in heads or src is None:
            continue
        part = tuple(t[i:i + 1] for t in src[:3])
        with torch.no_grad():
            pred = _predict(heads[key], *part[:1], part[1], part[2])[0, -1]
        ax.plot(x_fut, pred, color=color, linewidth=1.3, label=what)
    ax.axvline(0, color="0.6", linestyle=":")
    ax.set_title(f"{name}: test window {i} of {len(windows)}, last channel, {h} steps ahead")
    ax.set_xlabel("step (0 = first forecast step)")
    ax.set_ylabel("standardized value")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def forecast_table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for h, row in result["horizons"].items():
        enc = row["encoder"]
        line = f"MSE {enc['mse']:.4f}  MAE {enc['mae']:.4f}  (val MSE {enc['val_mse']:.4f}, lr {enc['lr']:g}, epoch {enc['epoch']})"
        rows.append((f"H={h} encoder", line))
        if "random_init" in row:
            r = row["random_init"]
            rows.append((f"H={h} random init", f"MSE {r['mse']:.4f}  MAE {r['mae']:.4f}"))
        if "input_linear" in row:
            b = row["input_linear"]
            rows.append((f"H={h} input linear", f"MSE {b['mse']:.4f}  MAE {b['mae']:.4f}"))
    return rows
