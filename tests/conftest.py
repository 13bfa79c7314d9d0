"""Shared fixtures: keep every test on CPU, offline, single-threaded-deterministic, in tmp dirs."""

import os

import pytest
import torch

os.environ.setdefault("SELFSUP_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache-unused"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSUP_CACHE_DIR", str(tmp_path / "selfsup-cache"))
    torch.manual_seed(0)
    yield


TINY = [
    "data.limit=64", "data.batch_size=16", "data.eval_batch_size=256",
    "method.proj_hidden_dim=32", "method.proj_dim=16",
    "augment.views.0.size=16", "augment.views.1.size=16",
    "trainer.progress=false", "trainer.precision=32", "trainer.device=cpu",
    "optim.name=sgd", "optim.lr=0.5", "optim.warmup_epochs=0",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    """A SimCLR run small enough to train in about a second: 64 images, 16-px crops."""
    return [*TINY, f"trainer.out_dir={tmp_path / 'runs'}"]


def resume_matches_straight(cfg, tmp_path, until_step: int, data=None):
    """Train ``cfg`` straight through, and again stopped at ``until_step`` then resumed from its
    checkpoint; assert both end with the same weights and buffers (1e-6, fp32). ``data``: given
    to every ``fit`` (a Python Dataset or iterable) instead of ``cfg.data.source``.
    Returns (the checkpoint at the stop, the final state dict) for method-specific checks."""
    from selfsup.checkpoint import load_checkpoint
    from selfsup.train.trainer import Trainer

    Trainer(cfg, run_dir=tmp_path / "straight").fit(data=data)
    Trainer(cfg, run_dir=tmp_path / "split").fit(data=data, until_step=until_step)
    mid = load_checkpoint(tmp_path / "split")
    assert mid["position"]["step"] == until_step
    Trainer(cfg, run_dir=tmp_path / "split", resume=mid).fit(data=data)
    a = load_checkpoint(tmp_path / "straight")["model"]
    b = load_checkpoint(tmp_path / "split")["model"]
    assert a.keys() == b.keys()
    for k in a:
        if not torch.is_tensor(a[k]):  # extra state (a text encoder's tokenizer)
            assert a[k] == b[k], k
            continue
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k
    return mid, a


def train_recipe_two_steps(name: str, tmp_path, overrides: list[str]) -> dict:
    """``selfsup pretrain`` from ``configs/<name>/cifar10.yaml`` for 2 steps on the embedded data
    (ResNet without the CIFAR stem, no final kNN); asserts it finished as ``name`` after 2 steps
    with a finite loss and returns its summary.json."""
    import json
    import math
    from pathlib import Path

    from selfsup.cli import main

    recipe = Path(__file__).parents[1] / "configs" / name / "cifar10.yaml"
    rc = main(["pretrain", "--config", str(recipe), *overrides, "data.source=embedded", "backbone.cifar_stem=false",
               f"trainer.out_dir={tmp_path}", "trainer.run_name=r", "trainer.max_steps=2", "trainer.log_every=1",
               "eval.final_knn=false"])
    assert rc == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["finished"] and summary["position"]["step"] == 2 and summary["method"] == name
    assert math.isfinite(summary["final_loss"])
    return summary
