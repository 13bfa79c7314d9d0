"""Glue between checkpoints, datasets and the modality-agnostic protocols in ``selfsup.eval``:
rebuild a method from a checkpoint, embed a labeled split (cached per checkpoint), run a
protocol, return a JSON-able dict."""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from selfsup.checkpoint import load_checkpoint, load_weights, remove_stale_temp_files
from selfsup.config import Config, load_config
from selfsup.core.build import build_method
from selfsup.core.method import Method
from selfsup.core.runtime import resolve_device, resolve_precision
from selfsup.errors import DataError
from selfsup.eval import (
    FeatureCache,
    extract_features,
    knn_classify,
    linear_probe,
    make_key,
)


def load_method(checkpoint: str | Path, device: torch.device | str = "cpu",
                overrides: list[str] | None = None) -> tuple[Method, Config, Path]:
    """The trained method of a checkpoint (or run directory), in eval mode on ``device``."""
    path = Path(checkpoint)
    path = path / "last.ckpt" if path.is_dir() else path
    ckpt = load_checkpoint(path)
    cfg = load_config(base_tree=ckpt["config"], overrides=overrides)
    method = build_method(cfg)
    load_weights(method, ckpt["model"], path)
    return method.to(device).eval(), cfg, path


def load_split(cfg: Config, split: str, source: str | None = None):
    from selfsup.data import load_dataset

    src = source or cfg.data.source
    return load_dataset(src, split, root=cfg.data.root, decode_size=cfg.data.decode_size,
                        download=cfg.data.download)


def load_feature_split(cfg: Config, split: str, source: str | None = None):
    """A labeled split to embed, read by the reader of the method's modality for evaluation. Images
    are opened as ``data.mode`` says (data/modes.py): in memory, or streamed from their folder with
    every image prepared in the loader workers (resize, centre crop to the method's eval size,
    ``augment.views.0.size``), so a bank of any size can be embedded; texts are tokenized examples."""
    from selfsup.data.modes import is_folder_source
    from selfsup.registry import get_modality, run_modality

    src = source or cfg.data.source
    mode = cfg.data.mode if is_folder_source(src) else "auto"  # a run streamed from a folder, evaluated on CIFAR
    modality = get_modality(run_modality(cfg.method.name, cfg.backbone.name, src))
    return modality.open(replace(cfg, data=replace(cfg.data, source=src, mode=mode)), split, evaluation=True).dataset


def embed_dataset(method: Method, dataset, *, device: torch.device, batch_size: int = 512,
                  precision: str = "32", desc: str = "features",
                  workers: int | None = None, tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every sample of ``dataset`` (in order) from ``method.embed`` (with ``tokens``: the token
    features of ``method.embed_tokens``, (N, T, D)); a streamed source is decoded by ``workers`` loader
    workers (see ``selfsup.data.loader.make_loader``)."""
    from selfsup.data.loader import make_loader

    loader = make_loader(dataset, batch_size, workers=workers, shuffle=False, drop_last=False)
    autocast = nullcontext()
    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        autocast = torch.autocast(device_type=device.type, dtype=dtype)
    was_training = method.training
    method.eval()
    try:
        with autocast:
            if not tokens:
                return extract_features(method.embed, loader, device=device, desc=desc, total=len(loader))
            shape: list[tuple[int, ...]] = []

            def embed_tokens(batch: dict) -> torch.Tensor:
                out = method.embed_tokens(batch)
                shape.append(tuple(out.shape[1:]))
                return out

            feats, labels = extract_features(embed_tokens, loader, device=device, desc=desc, total=len(loader))
            return feats.view(feats.shape[0], *shape[0]), labels
    finally:
        method.train(was_training)


def labeled_features(method: Method, cfg: Config, *, device: torch.device, source: str | None = None,
                     train_split: str | None = None, test_split: str | None = None,
                     cache_dir: Path | None = None, cache_tag: str | None = None, precision: str = "32"):
    """(train_feats, train_labels, test_feats, test_labels, classes) for a labeled dataset.
    With ``cache_dir`` and ``cache_tag`` (identifying the weights) features are cached on disk,
    keyed on the weights, the preprocessing and the data itself (see ``data_fingerprint``): the
    data is loaded first, so images added, removed or changed since are never answered from
    the cache."""
    out = []
    classes: list[str] = []
    cache = FeatureCache(cache_dir) if cache_dir is not None and cache_tag is not None else None
    if cache is not None and cache.directory.is_dir():
        remove_stale_temp_files(cache.directory)  # entries an evaluation killed mid-write left
    for role, split in (("train", train_split or cfg.data.train_split), ("test", test_split or cfg.data.test_split)):
        dataset = load_feature_split(cfg, split, source)
        if not dataset.has_labels:
            raise DataError(f"{source or cfg.data.source!r} split {split!r} has no labels; kNN and linear "
                            "evaluation need a labeled dataset (images: an ImageFolder with one subfolder per class; "
                            "text: a table with a label column; series: a labeled set, e.g. .ts files or an .npz "
                            "with y; a long series is judged by selfsup eval forecast)")
        classes = dataset.classes
        key = None
        if cache is not None:
            key = make_key(cache_tag, source or cfg.data.source, split, cfg.data.decode_size, method.eval_size,
                           precision, data_fingerprint(dataset))
            hit = cache.get(key)
            if hit is not None and hit[0].shape[0] == len(dataset):
                out.extend(hit)
                continue
        feats, labels = embed_dataset(method, dataset, device=device, precision=precision,
                                      batch_size=cfg.data.eval_batch_size, desc=f"{role} features",
                                      workers=cfg.data.workers)
        if key is not None:
            cache.put(key, feats, labels)
        out.extend((feats, labels))
    return (*out, classes)


def data_fingerprint(dataset) -> str:
    """What identifies a loaded dataset's contents: its own ``fingerprint`` when it has one, else a
    hash of its decoded pixels, labels and class names. Hashing the decoded tensor covers every
    way the data can change (files added, removed or edited, another decode size) at the cost of
    one pass over memory, as the decoded-data cache already makes on each load."""
    own = getattr(dataset, "fingerprint", None)
    if own:
        return str(own)
    from selfsup.data.cache import checksum

    return checksum({"images": dataset.images, "labels": dataset.labels, "classes": list(dataset.classes)})


def checkpoint_tag(path: Path) -> str:
    """Identifies a checkpoint file's contents: every save replaces the file (a new inode), so its
    path, size, modification time and inode change whenever the weights can have."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def same_images(feats: tuple) -> bool:
    """True when the test split is the bank split itself (a folder without train/ and test/
    subfolders serves both): identical labels and features, in the same order."""
    train_f, train_l, test_f, test_l = feats[:4]
    return (train_f.shape == test_f.shape and torch.equal(train_l, test_l) and torch.equal(train_f, test_f))


def run_knn(feats: tuple, cfg: Config) -> dict:
    """kNN top-1/top-5 per k; leave-one-out when the test split is the bank (see ``same_images``)."""
    train_f, train_l, test_f, test_l = feats[:4]
    return knn_classify(train_f, train_l, test_f, test_l, ks=tuple(cfg.eval.knn_k),
                        temperature=cfg.eval.knn_temperature, leave_one_out=same_images(feats))


def run_linear(feats: tuple, **kwargs) -> dict:
    train_f, train_l, test_f, test_l = feats[:4]
    return linear_probe(train_f, train_l, test_f, test_l, **kwargs)


def final_knn(method: Method, cfg: Config, device: torch.device, precision: str) -> dict:
    """kNN of the trained encoder and, for contrast, of the same architecture at random init on
    the same data: the gap is what pretraining bought. One random init's score varies by a few
    points with its seed, so ``random_init`` averages ``eval.random_init_seeds`` inits (seeds
    ``trainer.seed``, ``trainer.seed + 1``, ...; the first is the trained run's own init): per k, the
    mean ``top1``/``top5`` with ``top1_min``/``top1_max``; ``random_init_runs`` keeps each seed's
    scores. ``bank_samples`` and ``test_samples`` say how many labeled images the scores rest on."""
    feats = labeled_features(method, cfg, device=device, precision=precision)
    result = {"trained": run_knn(feats, cfg), "bank_samples": int(feats[0].shape[0]),
              "test_samples": int(feats[2].shape[0]), "leave_one_out": same_images(feats)}
    if cfg.eval.compare_random_init:
        runs = [{"seed": seed, "knn": _random_init_knn(method, cfg, seed, device, precision)}
                for seed in _random_init_seeds(cfg)]
        result["random_init"] = _mean_knn([r["knn"] for r in runs])
        result["random_init_runs"] = runs
    return result


def final_forecast(method: Method, cfg: Config, device: torch.device, precision: str) -> dict:
    """Forecasting at ``eval.forecast_horizons`` with a linear head on the frozen encoder (see
    ``selfsup.eval.forecast``), of the trained encoder and, per horizon, of the same architecture at
    random init (mean over ``eval.random_init_seeds`` inits, as ``final_knn``), beside the linear
    head on the input window itself."""
    from selfsup.eval.forecast import forecast_probe

    horizons = tuple(cfg.eval.forecast_horizons)
    result = forecast_probe(method, cfg, device=device, horizons=horizons, epochs=cfg.eval.forecast_epochs,
                            precision=precision)
    if cfg.eval.compare_random_init:
        seeds = _random_init_seeds(cfg)
        runs = [forecast_probe(_random_init(cfg, seed, device), cfg, device=device, horizons=horizons,
                               epochs=cfg.eval.forecast_epochs, precision=precision, baseline=False)
                for seed in seeds]
        for h, row in result["horizons"].items():
            scores = [r["horizons"][h]["encoder"] for r in runs]
            row["random_init"] = {"mse": sum(s["mse"] for s in scores) / len(scores),
                                  "mae": sum(s["mae"] for s in scores) / len(scores),
                                  "mse_runs": [s["mse"] for s in scores], "seeds": seeds}
    return result


def _random_init_seeds(cfg: Config) -> list[int]:
    """The random inits the final evaluations average: ``trainer.seed``, ``trainer.seed + 1``, ..."""
    return [cfg.trainer.seed + i for i in range(cfg.eval.random_init_seeds)]


def _random_init(cfg: Config, seed: int, device: torch.device) -> Method:
    """``cfg``'s architecture freshly built with ``seed`` (``build_method`` seeds from the config)."""
    return build_method(replace(cfg, trainer=replace(cfg.trainer, seed=seed))).to(device)


def _random_init_knn(method: Method, cfg: Config, seed: int, device: torch.device, precision: str) -> dict:
    """kNN of ``cfg``'s architecture freshly built with ``seed``."""
    rand = _random_init(cfg, seed, device)
    if method.channels_last and rand.use_channels_last(True):
        rand = rand.to(memory_format=torch.channels_last)
    return run_knn(labeled_features(rand, cfg, device=device, precision=precision), cfg)


def _mean_knn(results: list[dict]) -> dict:
    """Per k: the mean of each score over ``results``, and the range of top-1."""
    out = {}
    for k in results[0]:
        scores = {name: [r[k][name] for r in results] for name in results[0][k]}
        out[k] = {name: sum(v) / len(v) for name, v in scores.items()}
        out[k].update(top1_min=min(scores["top1"]), top1_max=max(scores["top1"]))
    return out


def language_model_scores(method: Method, cfg: Config, *, device: torch.device, split: str | None = None,
                          source: str | None = None, precision: str = "32", max_batches: int | None = None) -> dict:
    """Held-out language-model scores of a text method on ``split`` (default ``data.test_split``) read
    as training blocks on the unshifted grid: the mean loss per predicted token in nats, its
    perplexity ``exp(loss)`` and the top-1 accuracy (next token for causal LMs, the selected
    tokens for masked ones, the target spans for T5), over ``tokens`` predictions."""
    from tqdm import tqdm

    from selfsup.data.loader import make_loader
    from selfsup.registry import get_modality, run_modality

    src, split = source or cfg.data.source, split or cfg.data.test_split
    opened = get_modality(run_modality(cfg.method.name, cfg.backbone.name, src)).open(replace(cfg, data=replace(cfg.data, source=src)), split)
    loader = make_loader(opened.dataset, cfg.data.eval_batch_size, shuffle=False, drop_last=False)
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    autocast = nullcontext()
    if precision in ("bf16-mixed", "16-mixed"):
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
    sums = {"nll": 0.0, "correct": 0.0, "count": 0.0}
    was_training = method.training
    method.eval()
    try:
        bar = tqdm(loader, total=total, desc=f"scoring {split}", leave=False, disable=total < 5 or not sys.stderr.isatty())
        with autocast:
            for i, batch in enumerate(bar):
                if i >= total:
                    break
                scores = method.lm_scores({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
                for k in sums:
                    sums[k] += scores[k]
    finally:
        method.train(was_training)
    if not sums["count"]:
        raise DataError(f"{src} split {split!r} gave no tokens to score")
    loss = sums["nll"] / sums["count"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": 100.0 * sums["correct"] / sums["count"],
            "tokens": int(sums["count"]), "split": split, "data": opened.note}


def eval_device(pref: str = "auto") -> tuple[torch.device, str]:
    device = resolve_device(pref)
    return device, resolve_precision("auto", device)
