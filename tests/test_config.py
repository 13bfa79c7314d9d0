import pytest

from selfsup.config import load_config, load_yaml
from selfsup.errors import ConfigError


def write(path, text):
    path.write_text(text)
    return path


def test_recipe_inherits_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "optim: {lr: 0.1, weight_decay: 0.001}\ntrainer: {epochs: 10}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\noptim: {lr: 0.5}\nmethod: {name: simclr, temperature: 0.2}\n")
    cfg = load_config(child, ["trainer.epochs=3", "augment.views.1.size=24", "eval.knn_k=[5,10]"])
    assert cfg.optim.lr == 0.5  # child over base
    assert cfg.optim.weight_decay == 0.001  # kept from base
    assert cfg.trainer.epochs == 3  # command line over both
    assert cfg.method.temperature == 0.2
    assert cfg.augment.views[1].size == 24 and cfg.augment.views[0].size == 32
    assert cfg.eval.knn_k == [5, 10]
    assert isinstance(cfg.augment.views[0].crop_scale, tuple)


def test_multiple_bases_and_loop_detection(tmp_path):
    write(tmp_path / "a.yaml", "trainer: {epochs: 1, seed: 1}\n")
    write(tmp_path / "b.yaml", "trainer: {epochs: 2}\n")
    write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\n")
    assert load_yaml(tmp_path / "c.yaml") == {"trainer": {"epochs": 2, "seed": 1}}
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_yaml(tmp_path / "x.yaml")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lrr=0.1"])
    msg = str(err.value)
    assert "optim.lrr" in msg and "did you mean 'lr'" in msg and "weight_decay" in msg
    with pytest.raises(ConfigError, match="valid sections"):
        load_config(None, ["optimizer.lr=0.1"])
    with pytest.raises(ConfigError, match="unknown method 'simclrr'.*simclr"):
        load_config(None, ["method.name=simclrr"])


@pytest.mark.parametrize("override, match", [
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("method.temperature=0", "temperature"),
    ("data.batch_size=1", "data.batch_size"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("augment.views.0.hflip_p=1.5", "hflip_p"),
    ("trainer.epochs=two", "expected an integer"),
    ("augment.views.5.size=3", "index must be"),
])
def test_out_of_range_values_rejected(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_yaml_and_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "optim: [unclosed\n"))


def test_repo_recipes_all_load():
    from pathlib import Path

    from selfsup.registry import METHODS

    root = Path(__file__).parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    # bases (configs/_base/*.yaml) are loaded through their children, never alone
    bases = [p for p in files if any(part.startswith("_") for part in p.relative_to(root).parts)]
    recipes = [p for p in files if p not in bases]
    assert bases and all(p.parent.name == "_base" for p in bases)
    for recipe in recipes:  # configs/<method>/<dataset>.yaml
        assert load_config(recipe).method.name == recipe.parent.name, recipe
    assert {p.parent.name for p in recipes} == set(METHODS)  # every method has a recipe
