"""The Python API: selfsup.create / selfsup.load, ``loss, metrics = model(batch)``, ``model.encode``,
``model.encoder`` and ``init_from`` / ``--init``."""

import pytest
import torch
from conftest import TINY
from test_skipped_step import RECIPES

import selfsup
from selfsup.checkpoint import load_checkpoint
from selfsup.cli import main
from selfsup.config import load_config
from selfsup.errors import CheckpointError, ConfigError
from selfsup.train.trainer import Trainer


def _images(n=8, side=32):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_method_unpacks_loss_and_metrics_and_encodes(name):
    recipe, overrides = RECIPES[name]
    model = selfsup.create(load_config(recipe, [*overrides, "trainer.precision=32"]))
    assert isinstance(model, getattr(selfsup, type(model).__name__))  # reachable by class name
    if model.modality == "text":  # token blocks in, a pooled sequence feature out
        ids = torch.randint(5, model.backbone.vocab_size, (4, 17), generator=torch.Generator().manual_seed(3))
        loss, metrics = model({"tokens": ids})
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad and isinstance(metrics, dict)
        model.eval()
        mask = torch.ones(4, 16, dtype=torch.int64)
        mask[0, 10:] = 0
        with torch.no_grad():
            feats = model.encode(ids[:, :16], mask)
            assert feats.shape == (4, model.encoder.out_dim)
            assert torch.equal(model.encoder(ids[:, :16], mask, causal=model.causal), feats)
        return
    if model.modality == "series":  # windows (B, C, T) in, each channel's pooled tokens side by side out
        x = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(3))
        loss, metrics = model({"series": x})
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad and isinstance(metrics, dict)
        model.eval()
        with torch.no_grad():
            feats = model.encode(x)
            from selfsup.backbones import PatchTST

            per_channel = isinstance(model.encoder, PatchTST)  # each channel's pooled tokens; TS2Vec: one vector
            assert feats.shape == (4, (7 if per_channel else 1) * model.encoder.out_dim)
            assert torch.equal(model.encoder(x), feats) and torch.equal(model.embed({"series": x}), feats)
        return
    if model.modality == "audio":  # waveforms (B, 1, samples) in, the pooled spectrogram-patch tokens out
        x = 0.1 * torch.randn(4, 1, 4000, generator=torch.Generator().manual_seed(3))
        loss, metrics = model({"audio": x})
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad and isinstance(metrics, dict)
        model.eval()
        with torch.no_grad():
            spec = model.preprocess({"audio": x})
            assert spec.shape == (4, 1, model.encoder.frames, model.encoder.n_mels)
            feats = model.encode(spec)
            assert feats.shape == (4, model.encoder.out_dim)
            assert torch.equal(model.encoder(x), feats) and torch.equal(model.embed({"audio": x}), feats)
        return
    if model.modality == "video":  # uint8 clips (B, T, 3, H, W) in, the mean of the tubelet tokens out
        enc = model.encoder
        x = torch.randint(0, 256, (4, enc.num_frames, 3, enc.img_size, enc.img_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(3))
        motion = torch.randint(-2, 3, (4, enc.num_frames - 1, 2), generator=torch.Generator().manual_seed(3)).float()
        loss, metrics = model({"video": x, "motion": motion})  # the action-conditioned model reads the motion
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad and isinstance(metrics, dict)
        model.eval()
        with torch.no_grad():
            clips = model.preprocess({"video": x})
            assert clips.shape == (4, 3, enc.num_frames, enc.img_size, enc.img_size)
            feats = model.encode(clips)
            assert feats.shape == (4, enc.out_dim)
            assert torch.equal(enc(clips), feats) and torch.equal(model.embed({"video": x}), feats)
        return
    if name == "beit":  # BEiT's visual tokenizer is fitted on data before training
        model.fit_tokenizer(_images(64))
    loss, metrics = model({"images": _images()})
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert isinstance(metrics, dict)
    model.eval()
    x = model.preprocess({"images": _images(4)})
    with torch.no_grad():
        feats = model.encode(x)
        assert feats.shape == (4, model.encoder.out_dim)
        if name != "jigsaw":  # jigsaw's encode reads tile features through the same encoder
            assert torch.equal(model.encoder(x), feats)


def test_create_by_name_with_keyword_overrides():
    model = selfsup.create("simclr", backbone="resnet34", temperature=0.2, optim={"lr": 0.1},
                           **{"data.batch_size": 32, "augment.views.0.crop_scale": (0.2, 1.0)})
    cfg = model.run_config
    assert type(model).__name__ == "SimCLR" and cfg.backbone.name == "resnet34"
    assert (model.cfg.temperature, cfg.optim.lr, cfg.data.batch_size) == (0.2, 0.1, 32)
    assert tuple(cfg.augment.views[0].crop_scale) == (0.2, 1.0)
    with pytest.raises(ConfigError, match="temprature"):
        selfsup.create("simclr", temprature=0.2)
    with pytest.raises(ConfigError, match="unknown method"):
        selfsup.create("simclrr")
    with pytest.raises(ConfigError, match="mapping"):
        selfsup.create("simclr", optim=0.1)


def _train(tmp_path, name, overrides):
    cfg = load_config(None, [*overrides, f"trainer.out_dir={tmp_path}", "trainer.max_steps=2", "eval.final_knn=false"])
    trainer = Trainer(cfg, run_dir=tmp_path / name)
    trainer.fit()
    return trainer


def test_load_a_run_a_checkpoint_and_an_export(tmp_path):
    trainer = _train(tmp_path, "a", TINY)
    x = trainer.method.preprocess({"images": _images(4)})
    trainer.method.eval()
    with torch.no_grad():
        want = trainer.method.encode(x)
        for path in (tmp_path / "a", tmp_path / "a" / "last.ckpt"):
            model = selfsup.load(path)
            assert not model.training and model.run_config.method.name == "simclr"
            assert torch.allclose(model.encode(x), want, atol=1e-6)
        assert main(["export", str(tmp_path / "a"), str(tmp_path / "enc.safetensors")]) == 0
        assert torch.allclose(selfsup.load(tmp_path / "enc.safetensors")(x), want, atol=1e-6)


def test_init_from_a_run_an_export_and_what_does_not_fit(tmp_path):
    src = _train(tmp_path, "src", TINY)
    want = {k: v.clone() for k, v in src.method.backbone.model.state_dict().items()}
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "enc.safetensors")]) == 0
    for source in (tmp_path / "src", tmp_path / "enc.safetensors"):
        # BYOL on the same backbone: the student takes the weights and the target restarts as its copy
        byol = selfsup.create(load_config(*RECIPES["byol"][:1], [*RECIPES["byol"][1], "backbone.width=64"]))
        report = byol.init_from(source)
        assert report["loaded"] == report["total"] == len(want) and not report["summary"]
        got = byol.backbone.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert all(torch.equal(a, b) for a, b in zip(byol.target_backbone.state_dict().values(), got.values()))
    narrow = selfsup.create("simclr", **{"backbone.width": 32})  # every conv of another shape
    report = narrow.init_from(tmp_path / "src")
    assert report["mismatched"] and "of another shape" in report["summary"]
    vit = selfsup.create("mae", backbone="vit_tiny", **{"backbone.depth": 1})
    with pytest.raises(CheckpointError, match="nothing in .* fits this backbone"):
        vit.init_from(tmp_path / "src")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        vit.init_from(tmp_path / "missing")


def test_a_checkpoint_records_its_encoder_and_init_reads_it(tmp_path):
    """An I-JEPA run told to read its EMA target (method.eval_encoder=target) records it as its
    encoder, and --init from it takes the target's weights, not the context encoder's."""
    recipe, overrides = RECIPES["ijepa"]
    overrides = [*overrides, "method.eval_encoder=target"]
    trainer = _train(tmp_path, "ij", overrides)
    assert load_checkpoint(tmp_path / "ij")["encoder"] == "target_backbone"
    target = trainer.method.target_backbone.model.state_dict()
    assert not all(torch.equal(a, b) for a, b in zip(target.values(), trainer.method.backbone.model.state_dict().values()))
    fresh = selfsup.create(load_config(recipe, overrides))
    fresh.init_from(tmp_path / "ij")
    assert all(torch.equal(fresh.backbone.model.state_dict()[k], v) for k, v in target.items())


def test_cli_init_reports_and_refuses_with_resume(tmp_path, capsys):
    _train(tmp_path, "src", TINY)
    args = ["pretrain", *TINY, f"trainer.out_dir={tmp_path}", "trainer.run_name=next", "trainer.max_steps=1",
            "eval.final_knn=false"]
    assert main([*args, "--init", str(tmp_path / "src")]) == 0
    err = capsys.readouterr().err
    assert f"initialized from {tmp_path / 'src' / 'last.ckpt'} (backbone)" in err
    assert load_checkpoint(tmp_path / "next")["config"]["backbone"]["init"] == str(tmp_path / "src")
    assert main(["pretrain", "--resume", str(tmp_path / "next"), "--init", str(tmp_path / "src")]) == 2
    assert "--init starts a new run" in capsys.readouterr().err


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("The same from Python")[1].split("```python\n")[1].split("```")[0]
    (tmp_path / "configs").symlink_to(Path(__file__).parents[1] / "configs")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["features"].shape == (32, 512) and scope["trainer"].step == 4
    assert scope["report"]["loaded"] == scope["report"]["total"]  # both recipes: the CIFAR ResNet-18
    assert type(scope["trained"]).__name__ == "SimCLR" and (tmp_path / "runs").is_dir()
