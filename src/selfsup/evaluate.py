"""Glue between checkpoints, datasets and the modality-agnostic protocols in ``selfsup.eval``:
rebuild a method from a checkpoint, embed a labeled split (cached per checkpoint), run a
protocol, return a JSON-able dict."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from selfsup.config import Config, load_config
from selfsup.errors import DataError
from selfsup.eval import FeatureCache, extract_features, knn_classify, linear_probe, make_key
from selfsup.methods.base import Method
from selfsup.train.checkpoint import load_checkpoint, load_weights
from selfsup.train.trainer import build_method, resolve_device, resolve_precision


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


def embed_dataset(method: Method, dataset, *, device: torch.device, batch_size: int = 512,
                  precision: str = "32", desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every sample of ``dataset`` (in order) from ``method.embed``."""
    from selfsup.data import BatchLoader

    loader = BatchLoader(dataset, batch_size, shuffle=False, drop_last=False)
    autocast = nullcontext()
    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        autocast = torch.autocast(device_type=device.type, dtype=dtype)
    was_training = method.training
    method.eval()
    try:
        with autocast:
            return extract_features(method.embed, loader, device=device, desc=desc, total=len(loader))
    finally:
        method.train(was_training)


def labeled_features(method: Method, cfg: Config, *, device: torch.device, source: str | None = None,
                     train_split: str | None = None, test_split: str | None = None,
                     cache_dir: Path | None = None, cache_tag: str | None = None, precision: str = "32"):
    """(train_feats, train_labels, test_feats, test_labels, classes) for a labeled dataset.
    With ``cache_dir`` and ``cache_tag`` (identifying the weights) features are cached on disk."""
    out = []
    classes: list[str] = []
    for role, split in (("train", train_split or cfg.data.train_split), ("test", test_split or cfg.data.test_split)):
        key = None
        if cache_dir is not None and cache_tag is not None:
            key = make_key(cache_tag, source or cfg.data.source, split, cfg.data.decode_size,
                           method.eval_size, precision)
            hit = FeatureCache(cache_dir).get(key)
            if hit is not None:
                out.extend(hit)
                continue
        dataset = load_split(cfg, split, source)
        if not dataset.has_labels:
            raise DataError(f"{source or cfg.data.source!r} split {split!r} has no labels; kNN and linear "
                            "evaluation need a labeled dataset (an ImageFolder with one subfolder per class)")
        classes = dataset.classes
        feats, labels = embed_dataset(method, dataset, device=device, precision=precision,
                                      batch_size=cfg.data.eval_batch_size, desc=f"{role} features")
        if key is not None:
            FeatureCache(cache_dir).put(key, feats, labels)
        out.extend((feats, labels))
    return (*out, classes)


def checkpoint_tag(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


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
    """kNN of the trained encoder and, for contrast, of the same architecture at random init
    (same seed, same data): the gap is what pretraining bought. ``bank_samples`` and
    ``test_samples`` say how many labeled images the scores rest on."""
    feats = labeled_features(method, cfg, device=device, precision=precision)
    result = {"trained": run_knn(feats, cfg), "bank_samples": int(feats[0].shape[0]),
              "test_samples": int(feats[2].shape[0]), "leave_one_out": same_images(feats)}
    if cfg.eval.compare_random_init:
        rand = build_method(cfg).to(device)
        if getattr(method, "channels_last", False):
            rand = rand.to(memory_format=torch.channels_last)
            rand.channels_last = True
        result["random_init"] = run_knn(labeled_features(rand, cfg, device=device, precision=precision), cfg)
    return result


def eval_device(pref: str = "auto") -> tuple[torch.device, str]:
    device = resolve_device(pref)
    return device, resolve_precision("auto", device)
