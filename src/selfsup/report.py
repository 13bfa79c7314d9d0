"""Run reports: one self-contained HTML page per run directory, with the figures that tell
whether a pretraining run worked.

``write_report(run_dir)`` reads what the trainer leaves in a run directory (``metrics.csv``,
``summary.json``, ``config.yaml``, ``last.ckpt``) and writes ``run_dir/report/report.html``
plus one PNG per figure next to it. The HTML embeds every PNG as a base64 data URI and uses
no external CSS, JavaScript or fonts, so it opens offline and can be mailed as one file.

Figures (each drawn only when its inputs exist; otherwise the page says why in one line):

- training loss against steps (raw and smoothed);
- schedules: learning rate, weight decay, and any EMA momentum / ``teacher_*`` column;
- collapse monitor: normalized embedding std with the alarm line at 0.1, RankMe effective
  rank, student-teacher cosine and any other ``monitor/*`` column;
- throughput and method-specific metrics;
- kNN accuracy: online kNN against epochs when the run logged it, else the final kNN of the
  trained encoder next to the same architecture at random init;
- a 2-D map (UMAP, else t-SNE, else PCA) of test-split features coloured by class;
- method-specific pictures: CLS-token attention of the last block for ViT backbones,
  prototype usage for methods with prototypes (SwAV-like ``prototypes``, DINO-like
  ``last_layer``), and originals / masked inputs / reconstructions for masked-image methods
  that expose ``reconstruct``.

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure`` rendered by the
Agg canvas), never through pyplot: no display is needed and the caller's backend is untouched.

Contracts a method can meet to get its pictures:

- ``prototype_scores(features) -> (N, K)``: scores of backbone features against the K
  prototypes (optional; without it the report applies the head owning ``last_layer``, or
  ``projector`` + cosine against ``prototypes``);
- ``reconstruct(images) -> (masked, reconstruction)``: ``images`` is a normalized batch as
  ``method.preprocess`` returns it; both outputs are ``(B, 3, H, W)`` in the same normalized
  space (the masked input with hidden patches zeroed or greyed, the model's reconstruction).

Example::

    from selfsup.report import write_report
    path = write_report("runs/simclr-20250101-120000")   # -> runs/.../report/report.html
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selfsup.errors import CheckpointError, ConfigError, DataError, SelfSupError, WriteError
from selfsup.train.checkpoint import write_atomic, write_text_atomic
from selfsup.train.monitor import STD_ALARM, UNIFORM_ALARM

log = logging.getLogger("selfsup")

__all__ = ["cls_attention", "project_2d", "prototype_scores", "read_metrics", "report_command", "write_report"]

_DPI = 110
_N_PICTURES = 8  # images shown in attention / reconstruction grids
_BASE_COLUMNS = {"step", "epoch", "loss", "lr", "wd", "img_s"}
_TINY_SET = 50  # below this many points the 2-D map uses PCA (UMAP / t-SNE need neighbours)


class _Skip(Exception):
    """A figure that cannot be drawn for this run; the message is shown in the report."""


@dataclass
class _Result:
    key: str
    title: str
    caption: str = ""
    path: Path | None = None
    note: str | None = None


# --------------------------------------------------------------------------------------
# inputs


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """``metrics.csv`` as ``{column: float array}``; empty cells (a column a row did not log,
    such as ``knn/top1`` on step rows) become NaN. Missing file: ``{}``."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    out: dict[str, np.ndarray] = {}
    for name in rows[0].keys():
        if name is None:
            continue
        values = []
        for row in rows:
            cell = row.get(name)
            try:
                values.append(float(cell) if cell not in (None, "") else math.nan)
            except ValueError:
                values.append(math.nan)
        out[name] = np.asarray(values, dtype=np.float64)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _series(metrics: dict[str, np.ndarray], column: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the rows where ``column`` has a finite value."""
    y = metrics.get(column)
    if y is None:
        return np.empty(0), np.empty(0)
    xs = metrics.get(x, np.arange(1, len(y) + 1, dtype=np.float64))
    keep = np.isfinite(y) & np.isfinite(xs)
    return xs[keep], y[keep]


def _has(metrics: dict[str, np.ndarray], column: str) -> bool:
    return _series(metrics, column)[1].size > 0


def _schedule_columns(metrics: dict[str, np.ndarray]) -> list[str]:
    """EMA momentum and teacher schedules (``momentum``, ``teacher_temp``, ``x/teacher_m``...)."""
    out = []
    for name in metrics:
        base = name.rsplit("/", 1)[-1]
        if name.startswith(("monitor/", "knn/")):
            continue
        if "momentum" in base or base.startswith("teacher_"):
            out.append(name)
    return out


# --------------------------------------------------------------------------------------
# the trained model and its test features (loaded once, only when a figure needs them)


class _Model:
    def __init__(self, run_dir: Path, data: str | None, max_points: int, device: str, seed: int) -> None:
        self.run_dir, self.data, self.max_points, self.seed = run_dir, data, max_points, seed
        self.device = torch.device(device)
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = build()
            except _Skip as err:
                self._cache[key] = err
            except Exception as err:  # report, don't crash: the other figures are still useful
                log.debug("report: %s failed", key, exc_info=True)
                skip = _Skip(f"{key} unavailable ({type(err).__name__}: {_first_line(err)})")
                skip.__cause__ = err  # write_report tells the user's own --data failing from the rest
                self._cache[key] = skip
        value = self._cache[key]
        if isinstance(value, _Skip):
            raise value
        return value

    @property
    def method(self):
        def build():
            from selfsup.evaluate import load_method

            ckpt = self.run_dir / "last.ckpt"
            if not ckpt.is_file():
                raise _Skip("no last.ckpt in the run directory")
            method, cfg, _ = load_method(ckpt, self.device)
            return method, cfg

        return self._get("checkpoint", build)

    @property
    def dataset(self):
        """The test split, subsampled to ``max_points`` with a seeded permutation."""

        def build():
            from selfsup.data import ImageArrayDataset
            from selfsup.evaluate import load_split

            _, cfg = self.method
            full = load_split(cfg, cfg.data.test_split, self.data)
            if len(full) > self.max_points:
                keep = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed))
                keep = keep[: self.max_points].sort().values
                return ImageArrayDataset(full.images[keep], full.labels[keep], full.classes,
                                         name=f"{full.name}[{self.max_points} of {len(full)}]")
            return full

        return self._get("test split", build)

    @property
    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        def build():
            from selfsup.evaluate import embed_dataset

            method, cfg = self.method
            return embed_dataset(method, self.dataset, device=self.device, batch_size=cfg.data.eval_batch_size,
                                 desc="report features")

        return self._get("features", build)

    def pictures(self, n: int = _N_PICTURES) -> tuple[torch.Tensor, list[str]]:
        """``n`` test images (uint8), one per class first so the grid shows variety, with titles."""
        ds = self.dataset
        labels = ds.labels
        order: list[int] = []
        if ds.has_labels:
            for c in range(len(ds.classes)):
                hits = (labels == c).nonzero().flatten()
                if hits.numel():
                    order.append(int(hits[0]))
                if len(order) == n:
                    break
        for i in range(len(ds)):
            if len(order) >= n:
                break
            if i not in order:
                order.append(i)
        idx = torch.tensor(order[:n], dtype=torch.long)
        titles = [ds.classes[int(labels[i])] if ds.has_labels else f"#{int(i)}" for i in idx]
        return ds.images[idx], titles


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


# --------------------------------------------------------------------------------------
# figures: each returns a matplotlib Figure or raises _Skip


def _figure(n_panels: int = 1, *, cols: int | None = None, panel_w: float = 4.6, panel_h: float = 3.2):
    from matplotlib.figure import Figure

    cols = cols or min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(panel_w * cols, panel_h * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _smooth(y: np.ndarray, frac: float = 0.05) -> np.ndarray:
    """Bias-corrected exponential moving average with a window of ~``frac`` of the run."""
    span = max(2.0, frac * len(y))
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(y)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(y):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def _line_panel(ax, metrics, column: str, *, title: str | None = None, ylabel: str | None = None,
                smooth: bool = False) -> None:
    x, y = _series(metrics, column)
    if smooth and len(y) > 20:
        ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
        ax.plot(x, _smooth(y), color="tab:blue", linewidth=1.8, label="smoothed")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.plot(x, y, color="tab:blue", linewidth=1.5, marker="o" if len(y) <= 30 else None, markersize=3)
    ax.set_title(title or column)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel or column)
    ax.grid(alpha=0.3)


def fig_loss(metrics, summary, model):
    if not _has(metrics, "loss"):
        raise _Skip("metrics.csv has no loss values")
    fig, (ax,) = _figure(1, panel_w=7.0, panel_h=3.6)
    _line_panel(ax, metrics, "loss", title="training loss", ylabel="loss", smooth=True)
    return fig


def fig_schedules(metrics, summary, model):
    columns = [c for c in ("lr", "wd") if _has(metrics, c)]
    columns += [c for c in _schedule_columns(metrics) if _has(metrics, c)]
    if not columns:
        raise _Skip("metrics.csv has no lr / wd / momentum columns")
    names = {"lr": ("learning rate", "learning rate"), "wd": ("weight decay", "weight decay")}
    fig, axes = _figure(len(columns))
    for ax, col in zip(axes, columns):
        title, ylabel = names.get(col, (col, col.rsplit("/", 1)[-1]))
        _line_panel(ax, metrics, col, title=title, ylabel=ylabel)
    return fig


def fig_monitor(metrics, summary, model):
    columns = [c for c in metrics if c.startswith("monitor/") and _has(metrics, c)]
    columns += [c for c in metrics if "student_teacher_cos" in c and c not in columns and _has(metrics, c)]
    if not columns:
        raise _Skip("metrics.csv has no monitor/* columns")
    first = ["monitor/std", "monitor/rank"]
    columns = [c for c in first if c in columns] + [c for c in columns if c not in first]
    fig, axes = _figure(len(columns))
    for ax, col in zip(axes, columns):
        if col == "monitor/std":
            _line_panel(ax, metrics, col, title="embedding std (normalized, x sqrt(d))", ylabel="std")
            ax.axhline(STD_ALARM, color="tab:red", linestyle="--", linewidth=1.2,
                       label=f"collapse alarm ({STD_ALARM:g})")
            ax.set_ylim(bottom=0)
            ax.legend(loc="best", fontsize=8)
        elif col == "monitor/rank":
            _line_panel(ax, metrics, col, title="effective rank (RankMe)", ylabel="rank")
            ax.set_ylim(bottom=0)
        elif "student_teacher_cos" in col:
            _line_panel(ax, metrics, col, title="student-teacher cosine", ylabel="cosine")
        elif col == "monitor/uniformity":
            _line_panel(ax, metrics, col, title="prediction entropy / ln K", ylabel="uniformity")
            ax.axhline(UNIFORM_ALARM, color="tab:red", linestyle="--", linewidth=1.2,
                       label=f"uniform-collapse alarm ({UNIFORM_ALARM:g})")
            ax.legend(loc="best", fontsize=8)
        else:
            _line_panel(ax, metrics, col, title=col.split("/", 1)[-1].replace("_", " "))
    return fig


def fig_metrics(metrics, summary, model):
    known = _BASE_COLUMNS | set(_schedule_columns(metrics))
    columns = [c for c in metrics if c not in known and not c.startswith(("monitor/", "knn/"))
               and "student_teacher_cos" not in c and _has(metrics, c)]
    if _has(metrics, "img_s"):
        columns = ["img_s", *columns]
    if not columns:
        raise _Skip("metrics.csv has no throughput or method metrics")
    fig, axes = _figure(len(columns))
    for ax, col in zip(axes, columns):
        if col == "img_s":
            _line_panel(ax, metrics, col, title="throughput", ylabel="images / s", smooth=True)
            ax.set_ylim(bottom=0)
        else:
            _line_panel(ax, metrics, col, title=col, smooth=True)
    return fig


def _final_knn(summary: dict) -> tuple[dict, dict]:
    knn = summary.get("knn") or {}
    return knn.get("trained") or {}, knn.get("random_init") or {}


def fig_knn(metrics, summary, model):
    from matplotlib.ticker import MaxNLocator

    trained, rand = _final_knn(summary)
    # online kNN: metrics.csv's knn/* columns against epochs, else summary["online_knn"]
    online = {c: _series(metrics, c, x="epoch") for c in metrics if c.startswith("knn/") and _has(metrics, c)}
    if not online and summary.get("online_knn"):
        pts = summary["online_knn"]
        online = {"knn/top1": (np.array([p["epoch"] for p in pts], float), np.array([p["top1"] for p in pts], float))}
    if online:
        fig, (ax,) = _figure(1, panel_w=7.0, panel_h=3.6)
        for col, (x, y) in online.items():
            ax.plot(x, y, marker="o", markersize=4, linewidth=1.6, label=f"online {col.split('/', 1)[-1]}")
        k = next(iter(trained), None)
        if k:
            ax.axhline(trained[k]["top1"], color="tab:green", linestyle="--", label=f"final top1 ({k})")
        if k and k in rand:
            ax.axhline(rand[k]["top1"], color="tab:gray", linestyle=":", label=f"random init top1 ({k})")
        ax.set_title("kNN accuracy on the test split during pretraining")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        return fig
    if trained:
        ks = list(trained)
        fig, (ax,) = _figure(1, panel_w=max(4.5, 2.2 * len(ks) + 2), panel_h=3.6)
        width = 0.38
        xs = np.arange(len(ks))
        bars = [("pretrained", trained, "tab:blue", -width / 2 if rand else 0.0)]
        if rand:
            bars.append(("random init", rand, "tab:gray", width / 2))
        for label, res, color, off in bars:
            vals = [res.get(k, {}).get("top1", math.nan) for k in ks]
            rects = ax.bar(xs + off, vals, width, label=label, color=color)
            ax.bar_label(rects, fmt="%.1f", fontsize=8, padding=2)
        ax.set_xticks(xs, [f"k = {k.lstrip('k')}" for k in ks])
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title("final kNN top-1: pretrained vs random init")
        top = max(v.get("top1", 0) for r in (trained, rand) for v in r.values())
        ax.set_ylim(0, max(5.0, 1.35 * top))
        ax.legend(loc="upper center", ncols=2, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        return fig
    reason = (summary.get("knn") or {}).get("skipped")
    raise _Skip(reason or "no kNN results (the run had eval.final_knn=false and no online kNN)")


def project_2d(feats: np.ndarray | torch.Tensor, how: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of (N, D) features and the name of the projection used.

    Features are L2-normalized first (Euclidean distance on the sphere ranks neighbours as
    cosine similarity does, the metric SSL embeddings are trained with). ``how``: "auto" (UMAP
    when ``umap-learn`` imports, else t-SNE, else PCA; PCA below 50 points), "umap", "tsne"
    or "pca". A projection that fails falls back to the next one.
    """
    x = torch.as_tensor(feats).double()
    x = torch.nn.functional.normalize(x.reshape(x.shape[0], -1), dim=1).numpy()
    n = x.shape[0]
    if n < 3:
        raise _Skip(f"only {n} points: nothing to map")
    order = {"auto": ["umap", "tsne", "pca"], "umap": ["umap", "tsne", "pca"], "tsne": ["tsne", "pca"],
             "pca": ["pca"]}.get(how)
    if order is None:
        raise ValueError(f"projection must be auto, umap, tsne or pca, got {how!r}")
    if n < _TINY_SET:
        order = ["pca"]
    for name in order:
        try:
            if name == "umap":
                import umap  # optional and slow to import (numba): only here

                reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), min_dist=0.1, random_state=seed)
                return np.asarray(reducer.fit_transform(x)), "UMAP"
            if name == "tsne":
                from sklearn.manifold import TSNE

                tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed)
                return np.asarray(tsne.fit_transform(x)), "t-SNE"
        except Exception as err:  # ImportError or a failing fit: fall back to the next one
            log.debug("report: %s projection failed: %s", name, err)
            continue
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.column_stack([coords, np.zeros(n)])
    return coords, "PCA"


def fig_embedding(metrics, summary, model, projection: str = "auto", seed: int = 0):
    feats, labels = model.features
    ds = model.dataset
    coords, name = project_2d(feats, projection, seed)
    fig, (ax,) = _figure(1, panel_w=7.4, panel_h=5.6)
    labeled = ds.has_labels
    if labeled:
        import matplotlib

        classes = ds.classes
        cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"]
        lab = labels.numpy()
        for c, cname in enumerate(classes):
            pts = coords[lab == c]
            if len(pts):
                color = cmap(c if len(classes) <= 20 else c / max(1, len(classes) - 1))
                ax.scatter(pts[:, 0], pts[:, 1], s=9, alpha=0.8, color=color, label=cname, linewidths=0)
        if len(classes) <= 20:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, markerscale=2.0, frameon=False,
                      title="class")
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=9, alpha=0.7, color="tab:blue", linewidths=0)
    ax.set_title(f"{name} of test-split features ({len(coords)} images"
                 f"{'' if labeled else ', unlabeled'})")
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _vit(method) -> nn.Module | None:
    """The timm VisionTransformer inside ``method.backbone`` (or None)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    backbone = getattr(method, "backbone", None)
    model = getattr(backbone, "model", backbone)
    return model if isinstance(model, VisionTransformer) else None


@torch.no_grad()
def cls_attention(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention of the CLS token to every patch in the last block, per head: ``(B, H, gh, gw)``.

    The last block's attention input (LayerNorm'd tokens) is captured with a forward pre-hook;
    q and k are recomputed from its ``qkv`` linear (timm's fused attention never materializes
    the attention matrix), then ``softmax(q k^T / sqrt(d))`` and the CLS row is kept.
    """
    attn = vit.blocks[-1].attn
    if getattr(vit, "cls_token", None) is None:
        raise _Skip("the ViT has no CLS token (global-pool model)")
    if not hasattr(attn, "qkv"):
        raise _Skip(f"the last block's attention ({type(attn).__name__}) has no qkv projection")
    captured: dict[str, torch.Tensor] = {}
    handle = attn.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0].detach()))
    try:
        vit(x)
    finally:
        handle.remove()
    tokens = captured["x"].float()
    b, n, _ = tokens.shape
    heads = attn.num_heads
    qkv = attn.qkv(tokens).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
    prefix = getattr(vit, "num_prefix_tokens", 1)
    cls_row = weights[:, :, 0, prefix:]
    gh, gw = vit.patch_embed.grid_size
    if cls_row.shape[-1] != gh * gw:
        raise _Skip(f"{cls_row.shape[-1]} patch tokens do not form the {gh}x{gw} patch grid")
    return cls_row.reshape(b, heads, gh, gw)


def _to_display(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalized (B, 3, H, W) -> (B, H, W, 3) floats in [0, 1]."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.detach().float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def fig_attention(metrics, summary, model):
    method, _ = model.method
    vit = _vit(method)
    if vit is None:
        raise _Skip("not a ViT backbone")
    images, titles = model.pictures()
    x = method.preprocess({"images": images.to(model.device)})
    maps = cls_attention(vit, x).mean(dim=1)  # mean over heads
    maps = torch.nn.functional.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = maps.flatten(1).min(1).values.view(-1, 1, 1)
    hi = maps.flatten(1).max(1).values.view(-1, 1, 1)
    maps = ((maps - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy()
    shown = _to_display(x, method.eval_mean, method.eval_std)
    n = len(shown)
    fig, axes = _figure(2 * n, cols=n, panel_w=1.7, panel_h=1.9)
    for i in range(n):
        top, bottom = axes[i], axes[n + i]
        top.imshow(shown[i], interpolation="nearest")
        top.set_title(titles[i], fontsize=8)
        bottom.imshow(shown[i], interpolation="nearest")
        bottom.imshow(maps[i], cmap="inferno", alpha=0.6, interpolation="bilinear")
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0].set_ylabel("image", fontsize=8)
    axes[n].set_ylabel("CLS attention", fontsize=8)
    fig.suptitle(f"last-block CLS attention (mean of {vit.blocks[-1].attn.num_heads} heads)")
    return fig


def _prototype_owner(method) -> tuple[str, nn.Module] | None:
    """The module holding a DINO-like ``last_layer`` (a teacher's head first)."""
    found = [(name.rsplit(".", 1)[0] if "." in name else "", name)
             for name, _ in method.named_modules() if name.rsplit(".", 1)[-1] == "last_layer"]
    if not found:
        return None
    found.sort(key=lambda item: "teacher" not in item[1])
    owner_name = found[0][0]
    return owner_name, (method.get_submodule(owner_name) if owner_name else method)


@torch.no_grad()
def prototype_scores(method, feats: torch.Tensor) -> torch.Tensor:
    """(N, K) scores of backbone features against a method's prototypes (see the module doc)."""
    device = next(method.parameters()).device
    feats = feats.to(device)
    if callable(getattr(method, "prototype_scores", None)):
        return method.prototype_scores(feats).float().cpu()
    owner = _prototype_owner(method)
    if owner is not None and owner[0]:
        return owner[1](feats).float().cpu()
    protos = getattr(method, "prototypes", None)
    if protos is None:
        raise _Skip("the method has no prototypes")
    weight = protos.weight if isinstance(protos, nn.Module) else torch.as_tensor(protos)
    z = feats
    if isinstance(getattr(method, "projector", None), nn.Module):
        z = method.projector(z)
    if weight.shape[-1] != z.shape[-1] and weight.shape[0] == z.shape[-1]:
        weight = weight.t()
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return (z @ torch.nn.functional.normalize(weight.float(), dim=1).t()).cpu()


def fig_prototypes(metrics, summary, model):
    method, _ = model.method
    if not (callable(getattr(method, "prototype_scores", None)) or getattr(method, "prototypes", None) is not None
            or _prototype_owner(method) is not None):
        raise _Skip("the method has no prototypes")
    feats, _ = model.features
    was_training = method.training
    method.eval()
    try:
        scores = prototype_scores(method, feats)
    finally:
        method.train(was_training)
    k = scores.shape[1]
    counts = torch.bincount(scores.argmax(dim=1), minlength=k).numpy()
    used = int((counts > 0).sum())
    p = counts[counts > 0] / counts.sum()
    perplexity = float(np.exp(-(p * np.log(p)).sum()))
    ordered = np.sort(counts)[::-1]
    fig, (ax,) = _figure(1, panel_w=7.0, panel_h=3.6)
    ranks = np.arange(1, k + 1)
    if k <= 256:
        ax.bar(ranks, ordered, width=1.0, color="tab:purple")
    else:
        ax.fill_between(ranks, ordered, step="mid", color="tab:purple", alpha=0.8)
    ax.axhline(counts.sum() / k, color="tab:gray", linestyle="--", linewidth=1, label="uniform usage")
    ax.set_title(f"prototype usage on {int(counts.sum())} test images: {used} of {k} used, "
                 f"perplexity {perplexity:.1f}")
    ax.set_xlabel("prototype (sorted by usage)")
    ax.set_ylabel("images assigned (argmax)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def fig_reconstruction(metrics, summary, model):
    method, _ = model.method
    if not callable(getattr(method, "reconstruct", None)):
        raise _Skip("the method has no reconstruct()")
    images, titles = model.pictures()
    x = method.preprocess({"images": images.to(model.device)})
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            masked, recon = method.reconstruct(x)
    finally:
        method.train(was_training)
    rows = [("original", x), ("masked", masked), ("reconstruction", recon)]
    n = x.shape[0]
    fig, axes = _figure(3 * n, cols=n, panel_w=1.7, panel_h=1.8)
    for r, (label, batch) in enumerate(rows):
        shown = _to_display(batch, method.eval_mean, method.eval_std)
        for i in range(n):
            ax = axes[r * n + i]
            ax.imshow(shown[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[i], fontsize=8)
        axes[r * n].set_ylabel(label, fontsize=8)
    fig.suptitle("masked-image modelling: originals, masked inputs, reconstructions")
    return fig


# (file stem, title, caption, draw)
_FIGURES: list[tuple[str, str, str, Callable]] = [
    ("loss", "Training loss", "Loss per logged optimizer step; the thick line is an exponential moving average.",
     fig_loss),
    ("schedules", "Schedules", "Learning rate and weight decay as applied at each step (warm-up then cosine), "
     "plus EMA momentum / teacher schedules when the method logs them.", fig_schedules),
    ("monitor", "Collapse monitor", "Embedding std of one view after L2 normalization, times sqrt(d): 1 is an "
     f"isotropic spread, below {STD_ALARM:g} (red line) the embeddings are collapsing. Effective rank is RankMe "
     "on the same batch (bounded by min(batch, d)). Student-teacher cosine, when present, near 1 for a long time "
     "can also signal collapse. Prediction uniformity (DINO, DINOv2, SwAV): the student's prediction entropy over "
     f"ln K; above {UNIFORM_ALARM:g} every prediction is uniform and the loss sits at ln K.", fig_monitor),
    ("metrics", "Throughput and method metrics", "Training images per second and the method's own metrics.",
     fig_metrics),
    ("knn", "kNN accuracy", "Weighted kNN top-1 on the labeled test split with the training split as the bank. "
     "Random init is the same architecture with the same seed, untrained: the gap is what pretraining bought.",
     fig_knn),
    ("embedding", "Embedding map", "Backbone features of a seeded random subset of the test split, projected to "
     "2-D and coloured by class: well-separated clusters mean classes are linearly (or kNN-) separable.",
     fig_embedding),
    ("attention", "Attention maps", "Attention of the CLS token to each patch in the last transformer block, "
     "averaged over heads and overlaid on the input (bright = attended).", fig_attention),
    ("prototypes", "Prototype usage", "Test images assigned to each prototype (argmax of the prototype scores), "
     "sorted. A few heavily used prototypes and many empty ones mean partial collapse; perplexity is the "
     "effective number of prototypes in use.", fig_prototypes),
    ("reconstruction", "Reconstructions", "Originals, the masked inputs the encoder saw, and the decoder's "
     "reconstructions.", fig_reconstruction),
]


def _render(out_dir: Path, key: str, title: str, caption: str, draw: Callable[[], Any]) -> _Result:
    """Draw one figure into ``out_dir/<key>.png`` (atomically: a full disk leaves no empty PNG)."""
    result = _Result(key, title, caption)
    try:
        fig = draw()
        path = out_dir / f"{key}.png"
        write_atomic(path, lambda fh: fig.savefig(fh, dpi=_DPI, format="png", metadata={"Software": None},
                                                  facecolor="white"))
        result.path = path
    except _Skip as err:
        result.note = str(err)
    except WriteError:  # a full disk is no figure's fault, and the HTML would not fit either
        raise
    except Exception as err:  # a report never fails because one figure did
        log.warning("report: figure %r failed: %s", key, err, exc_info=log.isEnabledFor(logging.DEBUG))
        result.note = f"could not be drawn ({type(err).__name__}: {_first_line(err)})"
    return result


# --------------------------------------------------------------------------------------
# HTML


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table.summary { border-collapse: collapse; font-size: 0.92em; }
table.summary td { padding: 0.2em 1.2em 0.2em 0; vertical-align: top; }
table.summary td:first-child { color: #666; white-space: nowrap; }
img { max-width: 100%; height: auto; }
p.caption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
ul.skipped { color: #777; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def _header_rows(summary: dict, cfg_tree: dict, metrics: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    method = summary.get("method") or (cfg_tree.get("method") or {}).get("name") or "unknown"
    paper = ""
    try:
        from selfsup.registry import get_method

        paper = get_method(method).paper
    except Exception:
        pass
    rows.append(("method", f"{method}" + (f" ({paper})" if paper else "")))
    rows.append(("backbone", str((cfg_tree.get("backbone") or {}).get("name", "n/a"))))
    data = summary.get("data") or {}
    source = data.get("source") or (cfg_tree.get("data") or {}).get("source", "n/a")
    rows.append(("data", f"{source}" + (f", {data['train_samples']} training samples" if "train_samples" in data
                                         else "")))
    pos = summary.get("position") or {}
    if pos:
        epochs = (cfg_tree.get("trainer") or {}).get("epochs")
        state = "finished" if summary.get("finished") else "stopped early" if summary.get("stopped_early") else \
            "not finished"
        rows.append(("steps", f"{pos.get('step')} / {pos.get('total_steps')} ({pos.get('epoch')} of "
                              f"{epochs if epochs is not None else '?'} epochs, {state})"))
    elif "step" in metrics and metrics["step"].size:
        rows.append(("steps", f"{int(np.nanmax(metrics['step']))} (from metrics.csv; no summary.json)"))
    final_loss = summary.get("final_loss")
    if final_loss is None and _has(metrics, "loss"):
        final_loss = float(_series(metrics, "loss")[1][-1])
    rows.append(("final loss", _fmt(final_loss)))
    trained, rand = _final_knn(summary)
    for k, res in trained.items():
        text = f"{res['top1']:.2f}%" + (f" (top-5 {res['top5']:.2f}%)" if "top5" in res else "")
        if k in rand:
            gain = res["top1"] - rand[k]["top1"]
            text += f"; random init {rand[k]['top1']:.2f}%; gain {gain:+.2f} points"
        rows.append((f"kNN top-1 ({k})", text))
    if (summary.get("knn") or {}).get("skipped"):
        rows.append(("kNN", f"skipped: {summary['knn']['skipped']}"))
    if summary.get("online_knn"):
        last = summary["online_knn"][-1]
        rows.append(("online kNN (last)", f"{last['top1']:.2f}% at epoch {last['epoch']}"))
    t = summary.get("timings") or {}
    if t:
        parts = [f"training {_fmt(t.get('train_seconds'), '.1f')} s"]
        if t.get("images_per_second"):
            parts.append(f"{t['images_per_second']:.0f} images/s")
        total = t.get("total_seconds_this_session", t.get("wall_seconds_this_session"))
        if total is not None:
            parts.append(f"session total {total:.1f} s")
        rows.append(("timings", ", ".join(parts)))
    if summary.get("device"):
        rows.append(("device", f"{summary['device']}, precision {summary.get('precision')}, "
                               f"world size {summary.get('world_size')}"))
    mon = summary.get("monitor") or {}
    if mon:
        rows.append(("collapse monitor", f"last std {_fmt(mon.get('last_std'), '.3f')}, "
                                         f"min std {_fmt(mon.get('min_std'), '.3f')}, "
                                         f"rank {_fmt(mon.get('last_rank'), '.1f')}, "
                                         f"alarm steps {mon.get('alarm_steps', 0)}"))
        if mon.get("last_uniformity") is not None:
            rows.append(("prediction uniformity", f"last {_fmt(mon.get('last_uniformity'), '.4f')} of ln K, "
                                                  f"alarm steps {mon.get('uniform_alarm_steps', 0)}"))
    if summary.get("bad_steps_skipped"):
        rows.append(("non-finite steps skipped", str(summary["bad_steps_skipped"])))
    versions = summary.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform")))
    return rows


def _html(run_dir: Path, rows: list[tuple[str, str]], results: list[_Result], config_text: str) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>selfsup report: {esc(run_dir.name)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>selfsup run report: {esc(run_dir.name)}</h1>",
             f'<p class="caption">{esc(str(run_dir.resolve()))}</p>', '<table class="summary">']
    parts += [f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows]
    parts.append("</table>")
    for res in results:
        if res.path is None:
            continue
        data = base64.b64encode(res.path.read_bytes()).decode("ascii")
        parts += [f'<h2 id="{res.key}">{esc(res.title)}</h2>',
                  f'<img src="data:image/png;base64,{data}" alt="{esc(res.title)}">',
                  f'<p class="caption">{esc(res.caption)}</p>']
    skipped = [r for r in results if r.path is None]
    if skipped:
        parts.append("<h2>Not drawn</h2><ul class=\"skipped\">")
        parts += [f"<li>{esc(r.title)}: {esc(r.note or 'skipped')}</li>" for r in skipped]
        parts.append("</ul>")
    parts += ["<h2>Configuration</h2>", f"<pre>{esc(config_text or '(no config.yaml)')}</pre>", "</body></html>"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------
# entry points


def write_report(run_dir: str | Path, *, data: str | None = None, max_points: int = 2000, device: str = "cpu",
                 projection: str = "auto", seed: int = 0) -> Path:
    """Write ``run_dir/report/report.html`` (self-contained) and its PNGs; return the HTML path.

    Args:
        run_dir: a run directory written by ``selfsup pretrain``.
        data: labeled data for the embedding map and pictures (default: the run's
            ``data.source``; its ``data.test_split`` is used).
        max_points: test images in the embedding map (a seeded random subset).
        device: where to compute features ("cpu", "cuda", "auto").
        projection: "auto" (UMAP, else t-SNE, else PCA), "umap", "tsne" or "pca".
        seed: seeds the subset and the projection.

    A figure whose inputs are missing (no column, no labels, no checkpoint, not a ViT...) is
    listed under "Not drawn" with the reason; the report itself only fails when ``run_dir``
    is not a run directory, matplotlib is missing, an argument is out of range, ``data`` cannot
    be loaded, or the disk is full.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {str(run_dir)!r} does not exist")
    if not any((run_dir / f).exists() for f in ("metrics.csv", "summary.json", "last.ckpt")):
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory (no metrics.csv, summary.json or last.ckpt)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SelfSupError("the report needs matplotlib: pip install 'selfsup[report]'") from None
    if max_points < 1:
        raise ConfigError(f"max_points (--max-points) must be at least 1, got {max_points}")
    from selfsup.train.trainer import resolve_device

    model = _Model(run_dir, data, max_points, str(resolve_device(device)), seed)
    if data is not None:
        _check_data(model, data)

    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, *_ in _FIGURES:  # a figure skipped this time must not leave last time's PNG behind
        (out_dir / f"{key}.png").unlink(missing_ok=True)

    summary = _read_json(run_dir / "summary.json")
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else ""
    cfg_tree = summary.get("config") or {}
    if not cfg_tree and config_text:
        import yaml

        try:
            cfg_tree = yaml.safe_load(config_text) or {}
        except yaml.YAMLError:
            cfg_tree = {}
    metrics = read_metrics(run_dir / "metrics.csv")

    results = []
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        for key, title, caption, draw in _FIGURES:
            if draw is fig_embedding:
                fn = lambda d=draw: d(metrics, summary, model, projection=projection, seed=seed)  # noqa: E731
            else:
                fn = lambda d=draw: d(metrics, summary, model)  # noqa: E731
            results.append(_render(out_dir, key, title, caption, fn))

    path = out_dir / "report.html"
    write_text_atomic(path, _html(run_dir, _header_rows(summary, cfg_tree, metrics), results, config_text))
    return path


def _check_data(model: _Model, data: str) -> None:
    """Data the user named must load: a typo in ``--data`` is an error, not a line in the report.
    (The run's own data may have moved since training; that only leaves figures out.)"""
    try:
        with torch.random.fork_rng(devices=[]):  # building the model seeds torch
            model.dataset
    except _Skip as err:
        if isinstance(err.__cause__, DataError):
            raise DataError(f"--data {data}: {_first_line(err.__cause__)}") from None


def report_command(run_dir: str, data: str | None = None, *, device: str = "cpu", max_points: int = 2000,
                   projection: str = "auto") -> Path:
    """``selfsup report RUN_DIR [--data D]``: write the report and say where it went."""
    path = write_report(run_dir, data=data, max_points=max_points, device=device, projection=projection)
    figures = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"report: {path} ({len(figures)} figures: {', '.join(figures)})")
    return path
