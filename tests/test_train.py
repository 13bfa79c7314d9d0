import datetime
import json
import math

import pytest
import torch

from selfsup import checkpoint as ckpt_mod
from selfsup.checkpoint import load_checkpoint
from selfsup.cli import main
from selfsup.config import load_config
from selfsup.errors import TrainingError
from selfsup.evaluate import labeled_features, run_knn
from selfsup.train.trainer import Trainer


def _params(path):
    return load_checkpoint(path)["model"]


def test_resume_equals_uninterrupted(tmp_path, tiny_overrides):
    straight = load_config(None, [*tiny_overrides, "trainer.epochs=2"])
    Trainer(straight, run_dir=tmp_path / "straight").fit()

    Trainer(straight, run_dir=tmp_path / "split").fit(until_step=4)  # 4 steps = 1 epoch of 64 / 16
    resumed_ckpt = load_checkpoint(tmp_path / "split")
    assert resumed_ckpt["position"] == {"step": 4, "epoch": 1, "batch": 0}
    Trainer(straight, run_dir=tmp_path / "split", resume=resumed_ckpt).fit()

    a, b = _params(tmp_path / "straight" / "last.ckpt"), _params(tmp_path / "split" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k


def test_resume_mid_epoch(tmp_path, tiny_overrides):
    straight = load_config(None, [*tiny_overrides, "trainer.epochs=1"])
    Trainer(straight, run_dir=tmp_path / "straight").fit()
    Trainer(straight, run_dir=tmp_path / "split").fit(until_step=2)
    ck = load_checkpoint(tmp_path / "split")
    assert ck["position"] == {"step": 2, "epoch": 0, "batch": 2}
    Trainer(straight, run_dir=tmp_path / "split", resume=ck).fit()
    a, b = _params(tmp_path / "straight" / "last.ckpt"), _params(tmp_path / "split" / "last.ckpt")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, tiny_overrides, monkeypatch):
    cfg = load_config(None, [*tiny_overrides, "trainer.epochs=1"])
    trainer = Trainer(cfg, run_dir=tmp_path / "run")
    trainer.fit()
    good = load_checkpoint(tmp_path / "run")
    real_save = torch.save

    def dying_save(obj, fh, *a, **k):
        real_save({"half": torch.zeros(10)}, fh)  # some bytes reach the temp file ...
        raise KeyboardInterrupt("killed mid-save")  # ... then the process is "killed"

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    trainer.step += 1
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    after = load_checkpoint(tmp_path / "run")
    assert after["position"] == good["position"]
    assert not list((tmp_path / "run").glob("*.tmp")), "temp file left behind"


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "knn", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a readable selfsup checkpoint: not a complete PyTorch file" in err
    assert "weights_only" not in err and len(err.strip().splitlines()) == 1


def test_truncated_foreign_and_mismatched_checkpoints_get_one_line_reasons(tmp_path, capsys):
    whole = tmp_path / "whole.ckpt"
    torch.save({"model": {"w": torch.zeros(256)}, "config": {}}, whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.ckpt"  # a pickled object a weights_only load refuses
    torch.save({"model": {}, "config": {}, "when": datetime.date(2026, 1, 1)}, foreign)
    cases = {cut: "truncated, corrupted", foreign: "beyond tensors and plain containers",
             # config {} builds the default SimCLR, whose weights the file lacks
             whole: "weights missing from the file (e.g. backbone."}
    for path, reason in cases.items():
        assert main(["eval", "knn", "--checkpoint", str(path)]) == 2
        err = capsys.readouterr().err
        assert reason in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_nan_loss_skipped_then_stops_with_message(tmp_path, tiny_overrides, monkeypatch):
    cfg = load_config(None, [*tiny_overrides, "trainer.epochs=3", "trainer.max_bad_steps=3"])
    trainer = Trainer(cfg, run_dir=tmp_path / "run")
    real_forward = type(trainer.method).forward
    calls = {"n": 0}

    def flaky(self, batch):
        out = real_forward(self, batch)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 6:  # one isolated bad step, later a run of bad ones
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(type(trainer.method), "forward", flaky)
    with pytest.raises(TrainingError, match="NaN/Inf for 3 consecutive.*optim.lr.*precision"):
        trainer.fit()
    assert trainer.bad_steps_total == 4  # 1 isolated + 3 consecutive
    ck = load_checkpoint(tmp_path / "run")  # epoch 1 finished cleanly and was kept
    assert ck["position"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_cli_pretrain_eval_export_end_to_end(tmp_path, tiny_overrides, capsys):
    import torchvision
    from safetensors.torch import load_file

    from selfsup.export import load_encoder

    # the stock torchvision ResNet-18 layout, so the documented one-line load applies as written
    rc = main(["pretrain", *tiny_overrides, "trainer.epochs=1", "trainer.run_name=e2e",
               "backbone.width=64", "backbone.cifar_stem=false"])
    assert rc == 0
    run = tmp_path / "runs" / "e2e"
    out = capsys.readouterr().out
    assert "kNN top-1 (k20), pretrained" in out and "random init" in out and str(run) in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and math.isfinite(summary["final_loss"])
    assert {"trained", "random_init"} <= summary["knn"].keys()
    assert (summary["knn"]["bank_samples"], summary["knn"]["test_samples"]) == (5000, 1000)  # the embedded splits
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()

    # the checkpoint's kNN is the one pretraining reported for its final weights (same precision)
    assert main(["eval", "knn", "--checkpoint", str(run / "last.ckpt"), "--precision", "32"]) == 0
    result = json.loads((run / "eval_knn.json").read_text())
    assert result["test_samples"] == 1000
    assert result["k20"]["top1"] == pytest.approx(summary["knn"]["trained"]["k20"]["top1"], abs=0.15)  # <= 1 tie
    assert list((run / "features").glob("*.pt")), "features are cached per checkpoint"

    assert main(["eval", "linear", "--checkpoint", str(run), "--epochs", "2"]) == 0
    assert "best_top1" in json.loads((run / "eval_linear.json").read_text())
    assert main(["eval", "linear", "--checkpoint", str(run), "--solver", "lbfgs", "--out", str(tmp_path / "lr.json")]) == 0
    # (recomputing L-BFGS here would double its minutes; test_eval checks it against scikit-learn)
    lr_top1 = json.loads((tmp_path / "lr.json").read_text())["top1"]
    assert lr_top1 * 10 == pytest.approx(round(lr_top1 * 10))  # k of the 1000 test images

    target = tmp_path / "enc.safetensors"
    assert main(["export", str(run / "last.ckpt"), str(target)]) == 0
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(load_file(str(target)))  # the documented one-liner
    rebuilt = load_encoder(target)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(model(x), rebuilt(x), atol=1e-5)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["pretrain", "optim.lr=-1"]) == 2
    assert "optim.lr=-1" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", "--data", str(tmp_path / "empty")]) == 2
    assert "selfsup: error" in capsys.readouterr().err
    assert main(["pretrain", "nonsense"]) == 2


def test_methods_lists_simclr(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "simclr" in out and "Chen et al. 2020" in out


def test_online_knn_logged_every_epoch(tmp_path, tiny_overrides):
    import csv

    cfg = load_config(None, [*tiny_overrides, "trainer.epochs=2", "eval.online_every=1", "trainer.log_every=1"])
    trainer = Trainer(cfg, run_dir=tmp_path / "run")
    summary = trainer.fit()
    assert [e["epoch"] for e in summary["online_knn"]] == [1, 2]
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    knn = [float(r["knn/top1"]) for r in rows if r.get("knn/top1")]
    assert len(knn) == 2
    # the last one is the kNN of the final weights
    final = run_knn(labeled_features(trainer.method, cfg, device=torch.device("cpu"), precision="32"), cfg)
    assert knn[-1] == pytest.approx(next(iter(final.values()))["top1"], abs=1e-6)
    assert all(r["loss"] for r in rows if not r.get("knn/top1"))  # step rows kept their values


def test_switching_method_on_command_line_drops_old_hyperparameters():
    cfg = load_config(None, ["method.name=byol"])  # the default recipe is SimCLR's
    assert cfg.method.name == "byol" and not hasattr(cfg.method, "temperature")


def test_narrow_resnet_keeps_torchvision_names_and_zero_init():
    from selfsup.backbones import build_backbone
    from selfsup.config import BackboneConfig

    b = build_backbone(BackboneConfig(width=16, cifar_stem=True, zero_init_residual=True))
    assert b.out_dim == 128 and b(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert set(b.export_state_dict()) <= set(__import__("torchvision").models.resnet18().state_dict())
    assert float(b.model.layer2[0].bn2.weight.detach().abs().sum()) == 0.0


@pytest.mark.parametrize("name", ["simclr", "byol", "simsiam", "barlow_twins", "vicreg", "mocov2", "mocov3"])
def test_two_view_methods_refuse_other_view_counts(name):
    from pathlib import Path

    from selfsup.core.build import build_method
    from selfsup.errors import ConfigError

    recipe = Path(__file__).parents[1] / "configs" / name / "cifar10.yaml"
    one_view = load_config(recipe, ["augment.views=[{size: 32}]"])
    with pytest.raises(ConfigError, match=f"^{name} trains on exactly 2 views.*augment.views has 1"):
        build_method(one_view)
    if name.startswith("moco"):  # MoCo also refuses local crops, as every method without multi-crop, at load
        with pytest.raises(ConfigError, match=f"^{name} does not use local crops; augment.n_local=2 must be 0"):
            load_config(recipe, ["augment.n_local=2", "augment.local={size: 16}"])


def test_cli_output_paths_and_eval_settings_fail_in_one_line(tmp_path, tiny_overrides, capsys):
    assert main(["pretrain", *tiny_overrides, "trainer.epochs=1", "trainer.run_name=io"]) == 0
    run = tmp_path / "runs" / "io"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    capsys.readouterr()

    # export under a path whose parent is a file: one line, and no temp file left behind
    assert main(["export", str(run), str(blocker / "enc.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "could not write" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.tmp"))

    # eval: an --out that cannot be made stops before the work (no features extracted and cached);
    # one in new folders is made
    assert main(["eval", "knn", "--checkpoint", str(run), "--out", str(blocker / "k.json")]) == 2
    err = capsys.readouterr().err
    assert "selfsup: error" in err and len(err.strip().splitlines()) == 1
    assert not list(run.glob("features/*")), "features were extracted before the output path was checked"
    assert main(["eval", "knn", "--checkpoint", str(run), "--out", str(tmp_path / "new" / "dir" / "k.json")]) == 0
    assert json.loads((tmp_path / "new" / "dir" / "k.json").read_text())["protocol"] == "knn"
    assert list(run.glob("features/*")), "eval caches features (else the check above proves nothing)"
    capsys.readouterr()

    # few-shot with more ways than the data has classes
    assert main(["eval", "fewshot", "--checkpoint", str(run), "--n-way", "50"]) == 2
    err = capsys.readouterr().err
    assert "only 10 classes qualify" in err and "--n-way" in err


def test_write_text_atomic_replaces_whole_or_leaves_old(tmp_path):
    from selfsup.checkpoint import write_text_atomic

    target = tmp_path / "summary.json"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    folder = tmp_path / "a_folder"  # os.replace of a file over a folder fails: no temp file may stay
    folder.mkdir()
    with pytest.raises(OSError):
        write_text_atomic(folder, "text")
    assert folder.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["a_folder", "summary.json"]
