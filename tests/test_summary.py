"""What the pretraining summary claims: a gain over the mean of several random inits, with its
spread and error, and times that say which segments of a resumed run they cover."""

import json
import time

import pytest
import torch

from selfsup.checkpoint import load_checkpoint
from selfsup.cli import _print_pretrain_summary, main
from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.train.trainer import Trainer

SMALL = ["backbone.width=8", "eval.knn_k=[20]"]  # a narrow encoder and one k: quick to build, train and score


def small_labeled_folder(root):
    """An ImageFolder (train/ and test/, a folder per class) of 300 embedded CIFAR-10 images: a kNN
    on it costs milliseconds where the whole embedded set (6,000 images) costs seconds per encoder."""
    from torchvision.io import write_png

    from selfsup.data import load_dataset
    from selfsup.data.loader import limit_dataset

    for split, n in (("train", 200), ("test", 100)):
        data = limit_dataset(load_dataset("embedded", split), n)
        for i, (image, label) in enumerate(zip(data.images, data.labels)):
            folder = root / split / data.classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            write_png(image, str(folder / f"{i}.png"))
    return root


def test_random_init_is_the_mean_of_several_seeds_each_recorded(tmp_path, tiny_overrides):
    from selfsup.evaluate import final_knn, labeled_features, run_knn

    data = small_labeled_folder(tmp_path / "images")
    cfg = load_config(None, [*tiny_overrides, *SMALL, f"data.source={data}", "trainer.seed=5",
                             "eval.random_init_seeds=3"])
    method = build_method(cfg)  # stands in for the trained encoder: only the random-init side is checked
    result = final_knn(method, cfg, torch.device("cpu"), "32")
    runs = result["random_init_runs"]
    assert [r["seed"] for r in runs] == [5, 6, 7]
    top1 = [r["knn"]["k20"]["top1"] for r in runs]
    assert len(set(top1)) > 1, "different seeds, different random encoders"
    rand = result["random_init"]["k20"]
    assert rand["top1"] == pytest.approx(sum(top1) / 3)
    assert (rand["top1_min"], rand["top1_max"]) == (min(top1), max(top1))
    assert rand["top5"] == pytest.approx(sum(r["knn"]["k20"]["top5"] for r in runs) / 3)
    # seed 6 is the encoder trainer.seed=6 would start from
    seed6 = build_method(load_config(None, [*tiny_overrides, *SMALL, f"data.source={data}", "trainer.seed=6"]))
    assert runs[1]["knn"] == run_knn(labeled_features(seed6, cfg, device=torch.device("cpu")), cfg)


def test_eval_random_init_seeds_defaults_to_three_and_must_be_positive():
    from selfsup.errors import ConfigError

    assert load_config(None).eval.random_init_seeds == 3
    with pytest.raises(ConfigError, match="eval.random_init_seeds=0"):
        load_config(None, ["eval.random_init_seeds=0"])


def _summary(**timings) -> dict:
    return {"method": "simclr", "position": {"step": 156, "total_steps": 156}, "final_loss": 5.1,
            "knn": {"trained": {"k20": {"top1": 42.1}}, "test_samples": 1000, "bank_samples": 5000,
                    "random_init": {"k20": {"top1": 33.1, "top1_min": 32.2, "top1_max": 35.4}},
                    "random_init_runs": [{"seed": s, "knn": {}} for s in (0, 1, 2)]},
            "timings": timings, "data": {"skipped_images": 0}, "bad_steps_skipped": 0, "monitor": {},
            "run_dir": "runs/x"}


def _rows(capsys) -> dict[str, str]:
    """The printed summary table as {label: value}."""
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("pretraining summary") + 2:]  # after the title and its rule
    return {key.strip(): value.strip() for key, value in (line.split("  ", 1) for line in table)}


def test_printed_gain_is_over_the_random_init_mean_with_spread_and_binomial_error(capsys):
    _print_pretrain_summary(_summary(train_seconds=34.0, wall_seconds_this_session=40.0, segments=1,
                                     total_seconds_this_session=45.0, total_seconds=45.0))
    rows = _rows(capsys)
    assert rows["kNN top-1 (k20), pretrained"] == "42.1%"
    assert rows["kNN top-1 (k20), random init"] == "33.1% (mean of 3 seeds, 32.2-35.4)"
    # sqrt(0.421 x 0.579 / 1000) = 1.56 points
    assert rows["gain from pretraining"] == "+9.0 points (± 1.6 binomial s.e. of the trained score)"
    assert rows["training time (steps)"] == "34.0 s" and rows["total time"] == "45.0 s"


def test_resumed_run_reports_every_segment_and_this_session(tmp_path, tiny_overrides, capsys):
    cfg = load_config(None, [*tiny_overrides, *SMALL, "trainer.epochs=2", "trainer.run_name=r",
                             "eval.final_knn=false"])
    run = tmp_path / "runs" / "r"
    t0 = time.perf_counter()
    Trainer(cfg, run_dir=run).fit(until_step=6)
    first_segment = time.perf_counter() - t0
    ckpt = load_checkpoint(run)
    assert ckpt["history"]["segments"] == 1
    assert first_segment >= ckpt["history"]["wall_seconds"] >= ckpt["history"]["train_seconds"] > 0

    assert main(["pretrain", "--resume", str(run)]) == 0
    t = json.loads((run / "summary.json").read_text())["timings"]
    assert t["segments"] == 2 and t["wall_seconds_earlier_segments"] == ckpt["history"]["wall_seconds"]
    assert t["total_seconds"] == pytest.approx(t["wall_seconds_earlier_segments"] + t["total_seconds_this_session"])
    assert t["train_seconds"] > ckpt["history"]["train_seconds"]  # both segments' steps
    assert t["total_seconds"] >= t["wall_seconds"] >= t["train_seconds"]
    rows = _rows(capsys)
    assert rows["training time (steps, all 2 segments)"] == f"{t['train_seconds']:.1f} s"
    assert rows["total time (all 2 segments)"] == f"{t['total_seconds']:.1f} s"
    assert rows["total time (this session)"] == f"{t['total_seconds_this_session']:.1f} s"
    assert load_checkpoint(run)["history"]["segments"] == 2


def test_printed_summary_counts_skipped_files_by_reason(tmp_path, tiny_overrides, capsys):
    """The summary row says how many files were left out and why (before: 'unreadable images
    skipped' with one number, whatever the reason)."""
    root = small_labeled_folder(tmp_path / "data")
    (root / "train" / "cat" / "garbage.png").write_bytes(b"not an image at all")
    rc = main(["pretrain", *tiny_overrides, *SMALL, f"data.source={root}", "data.limit=null", "trainer.max_steps=1",
               "eval.final_knn=false", "trainer.run_name=skips"])
    assert rc == 0
    rows = _rows(capsys)
    assert rows["files skipped"] == "1 (1 unreadable)"
    summary = json.loads((tmp_path / "runs" / "skips" / "summary.json").read_text())
    assert summary["data"]["skip_reasons"] == {"unreadable": 1}
