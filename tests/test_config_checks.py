"""Checks made when a config loads or a name is registered, and the lr each parameter group of a
recipe really trains at."""

import importlib
import re
import sys
from pathlib import Path

import pytest

from selfsup import registry
from selfsup.cli import main
from selfsup.config import load_config
from selfsup.errors import ConfigError
from selfsup.registry import get_method

CONFIGS = Path(__file__).parents[1] / "configs"
get_method("simclr")  # imports every method, so the registry is complete at collection
MULTI_CROP = ["dino", "dinov2", "swav"]  # the methods whose forward trains on local crops
NO_LOCAL = sorted(set(registry.METHODS) - set(MULTI_CROP))
# what a method of each modality needs to load besides its name (the default encoder and data are images)
_MODALITY_ARGS = {"image": [], "text": ["backbone.name=text_tiny", "data.source=embedded-text"],
                  "series": ["data.source=embedded-series"],
                  "audio": ["data.source=embedded-audio", "backbone.name=audio_vit_tiny"],
                  "video": ["data.source=embedded-video", "backbone.name=video_vit_tiny"]}
_SERIES_ENCODER = {"ts2vec": "ts2vec"}  # the other series methods train PatchTST


def _own(name: str) -> list[str]:
    modality = registry.METHODS[name].modalities[0]
    encoder = [f"backbone.name={_SERIES_ENCODER.get(name, 'patchtst')}"] if modality == "series" else []
    if name in ("vjepa2", "vjepa2_ac"):  # V-JEPA 2 encodes positions with RoPE
        encoder.append("backbone.pos_embed=rope")
    return [f"method.name={name}", *_MODALITY_ARGS[modality], *encoder]


def test_only_the_multi_crop_methods_declare_local_crops():
    assert sorted(name for name, cls in registry.METHODS.items() if cls.uses_local_crops) == MULTI_CROP


@pytest.mark.parametrize("name", NO_LOCAL)
def test_local_crops_refused_at_load_by_methods_that_cannot_use_them(name):
    with pytest.raises(ConfigError, match=rf"^{name} does not use local crops; augment.n_local=2 must be 0$"):
        load_config(None, [*_own(name), "augment.n_local=2", "augment.local={size: 16}"])
    assert load_config(None, [*_own(name), "augment.n_local=0"]).augment.n_local == 0


@pytest.mark.parametrize("name", MULTI_CROP)
def test_multi_crop_recipes_keep_their_local_crops(name):
    assert load_config(CONFIGS / name / "cifar10.yaml").augment.n_local > 0


def test_local_crops_refusal_is_one_line_from_the_cli(capsys):
    assert main(["pretrain", "method.name=byol", "augment.n_local=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "selfsup: error: byol does not use local crops; augment.n_local=2 must be 0"


# --------------------------------------------------------------------------------------
# the registry: one object per name


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path for throwaway plugin modules, and registries the test may change freely."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "BACKBONES", dict(registry.BACKBONES))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("ssplug_")]:
        del sys.modules[mod]


METHOD_PLUGIN = """
from selfsup.core.method import Method
from selfsup.registry import register_method

@register_method
class Plugin(Method):
    name = {name!r}
"""

BACKBONE_PLUGIN = """
from selfsup.registry import register_backbone

@register_backbone({name!r}, modality="image")
def build(cfg):
    return None
"""


def test_a_second_method_under_a_taken_name_is_an_error_naming_both(plugin_dir):
    (plugin_dir / "ssplug_clash.py").write_text(METHOD_PLUGIN.format(name="simclr"))
    with pytest.raises(ValueError, match=r"method 'simclr' is registered twice: by selfsup\.methods\.simclr\.SimCLR "
                                         r"and by ssplug_clash\.Plugin"):
        importlib.import_module("ssplug_clash")
    assert registry.METHODS["simclr"].__module__ == "selfsup.methods.simclr"  # the first one stays


def test_a_second_backbone_under_a_taken_name_is_an_error_naming_both(plugin_dir):
    (plugin_dir / "ssplug_net.py").write_text(BACKBONE_PLUGIN.format(name="resnet18"))
    with pytest.raises(ValueError, match=r"backbone 'resnet18' is registered twice: by selfsup\.backbones\..*"
                                         r"and by ssplug_net\.build"):
        importlib.import_module("ssplug_net")


def test_reimporting_a_module_registers_its_new_definitions(plugin_dir):
    (plugin_dir / "ssplug_fresh.py").write_text(METHOD_PLUGIN.format(name="ssplug_method")
                                                + BACKBONE_PLUGIN.format(name="ssplug_net"))
    first = importlib.import_module("ssplug_fresh")
    old_cls = registry.METHODS["ssplug_method"]
    importlib.reload(first)  # the same definitions, new objects: replaced, as re-running a module should
    assert registry.METHODS["ssplug_method"] is first.Plugin is not old_cls
    assert registry.BACKBONES["ssplug_net"] is first.build


# --------------------------------------------------------------------------------------
# the lr each parameter group trains at, over a short real run of the recipe


def recording_trainer(cfg, run_dir):
    """A real Trainer that records, at each step, the lr of every parameter group as the optimizer
    is about to apply it (after the trainer set this step's schedule)."""
    from selfsup.train.trainer import Trainer

    class Recording(Trainer):
        def _train_step(self, micro_batches):
            self.lrs.append([g["lr"] for g in self.optimizer.param_groups])
            return super()._train_step(micro_batches)

    trainer = Recording(cfg, run_dir=run_dir)
    trainer.lrs = []
    return trainer


RUN = ["data.source=embedded", "data.limit=64", "data.batch_size=16", "trainer.epochs=2", "trainer.device=cpu",
       "trainer.precision=32", "trainer.progress=false", "trainer.ckpt_every=0"]


def test_simsiam_recipe_holds_the_predictor_at_the_base_lr_while_the_rest_follow_the_schedule(tmp_path):
    from selfsup.methods import simsiam
    from selfsup.nn.schedules import cosine_schedule

    # the recipe with a one-epoch warm-up added, so both ends of the schedule are seen
    cfg = load_config(CONFIGS / "simsiam" / "cifar10.yaml", [
        *RUN, "backbone.width=8", "augment.views.0.size=16", "augment.views.1.size=16", "method.proj_hidden_dim=32",
        "method.proj_dim=16", "method.pred_hidden_dim=8", "optim.warmup_epochs=1"])
    trainer = recording_trainer(cfg, tmp_path / "run")
    trainer.fit()
    base, steps = trainer.lr, trainer.total_steps
    assert base == pytest.approx(0.03 * 16 / 256) and steps == 8 and len(trainer.lrs) == steps
    predictor = {id(p) for p in trainer.method.predictor.parameters()}
    is_pred = [all(id(p) in predictor for p in g["params"]) for g in trainer.optimizer.param_groups]
    assert any(is_pred) and not all(is_pred)
    assert sum(len(g["params"]) for g, pred in zip(trainer.optimizer.param_groups, is_pred) if pred) == \
        len(predictor)
    for step, lrs in enumerate(trainer.lrs):
        scheduled = cosine_schedule(step, steps, base, 0.0, trainer.steps_per_epoch)
        for lr, pred in zip(lrs, is_pred):
            assert lr == pytest.approx(base if pred else scheduled, abs=1e-12), (step, pred)
    assert trainer.lrs[0][is_pred.index(False)] == 0.0  # the rest warmed up from 0 ...
    assert trainer.lrs[-1][is_pred.index(False)] < 0.2 * base  # ... and decayed
    # and the docs say so: no "the predictor's lr follows the cosine schedule" left
    docs = [simsiam.__doc__, *((CONFIGS / "simsiam" / f).read_text() for f in ("cifar10.yaml", "imagenet.yaml"))]
    assert not any(re.search(r"predictor's lr follows the cosine", " ".join(d.split())) for d in docs)


def test_ijepa_recipes_warm_up_from_the_start_lr_the_docstring_states(tmp_path):
    from selfsup.methods import ijepa
    from selfsup.nn.schedules import cosine_schedule

    stated = re.search(r"warm-up is the official one, linear from ``start_lr`` (\S+) to (\S+):", ijepa.__doc__)
    assert stated, "the I-JEPA docstring states where its warm-up starts"
    start, peak = float(stated.group(1)), float(stated.group(2))
    assert load_config(CONFIGS / "ijepa" / "imagenet.yaml").optim.warmup_start_lr == start
    cfg = load_config(CONFIGS / "ijepa" / "cifar10.yaml", [
        *RUN, "backbone.depth=1", "backbone.embed_dim=32", "backbone.num_heads=2", "method.pred_dim=16",
        "method.pred_depth=1", "optim.warmup_epochs=1"])
    trainer = recording_trainer(cfg, tmp_path / "run")
    trainer.fit()
    assert trainer.lr == peak and len(trainer.lrs) == trainer.total_steps == 8
    for step, lrs in enumerate(trainer.lrs):
        expected = cosine_schedule(step, 8, peak, cfg.optim.min_lr, trainer.steps_per_epoch, start)
        assert lrs == pytest.approx([expected] * len(lrs), abs=1e-12), step
    assert trainer.lrs[0][0] == pytest.approx(start)  # the first step trains at start_lr, not 0
    assert trainer.lrs[trainer.steps_per_epoch][0] == pytest.approx(peak)
