"""The modality-general core (selfsup.registry, selfsup.modalities) and training on a user's own data
(``Trainer(cfg).fit(data=...)``, selfsup.data.user).

The base Method knows no modality; every method declares the modalities it takes, and a batch,
a data source or an encoder of another modality is refused in one line. A Python Dataset of
(PIL image, label) pairs and a DataLoader of batches train with exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, resume_matches_straight
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import selfsup
from selfsup import registry as M
from selfsup.cli import main
from selfsup.config import load_config
from selfsup.core.method import Method
from selfsup.errors import ConfigError, DataError
from selfsup.registry import METHODS, get_method
from selfsup.train.trainer import Trainer


@pytest.fixture
def series_modality(monkeypatch):
    """A stand-in for the series modality for the test: batches keyed ``series``, and the only source it
    claims is ``toyseries`` (so the checks below do not depend on the real reader's rules)."""
    get_method("simclr")  # the real modalities and methods registered first: the stand-in replaces the series one
    M.get_modality("series")
    toy = M.Modality("series", ("series",), lambda source: source == "toyseries", lambda *a, **k: None)
    monkeypatch.setitem(M.MODALITIES, "series", toy)
    return toy


def test_the_base_method_knows_no_modality_and_every_method_declares_its_own():
    for name in ("make_views", "views", "layout", "require_two_views", "view_inputs"):
        assert not hasattr(Method, name), name
    assert Method.modalities == () and not Method.channels_last
    get_method("simclr")  # registers every method
    from selfsup.modalities.image import ImageMethod
    from selfsup.modalities.audio import AudioMethod
    from selfsup.modalities.series import SeriesMethod
    from selfsup.modalities.text import TextMethod
    from selfsup.modalities.video import VideoMethod

    from selfsup.modalities.views import ViewMethod

    base = {"image": ImageMethod, "text": TextMethod, "series": SeriesMethod, "audio": AudioMethod, "video": VideoMethod}
    for name, cls in METHODS.items():
        if issubclass(cls, ViewMethod):  # the two-view methods: images or series, by their encoder
            assert cls.modalities == ("image", "series"), name
            continue
        assert len(cls.modalities) == 1 and issubclass(cls, base[cls.modalities[0]]), name
    two_view = {name for name, cls in METHODS.items() if issubclass(cls, ViewMethod)}
    assert two_view == {"simclr", "mocov2", "mocov3", "byol", "simsiam", "barlow_twins", "vicreg"}
    assert M.modality_of_batch({"images": torch.zeros(1)}) == "image"
    assert M.modality_of_batch({"tokens": torch.zeros(1)}) == "text"
    assert M.modality_of_source("embedded") == "image"
    assert M.modality_of_batch({"series": torch.zeros(1)}) == "series"
    assert M.modality_of_source("embedded-series") == "series" and M.modality_of_source("ucr:GunPoint") == "series"


def test_a_batch_of_another_modality_is_one_line(series_modality):
    model = selfsup.create("simclr", **{"augment.views.0.size": 16, "augment.views.1.size": 16})
    with pytest.raises(ConfigError) as err:
        model({"series": torch.zeros(4, 3, 100)})
    assert str(err.value) == ("simclr takes image batches (key 'images'); it was given a series batch "
                              "(keys: series)")
    with pytest.raises(ConfigError, match=r"it was given a text batch \(keys: attention_mask, tokens\)"):
        model({"tokens": torch.zeros(4, 8, dtype=torch.long), "attention_mask": torch.ones(4, 8)})
    with pytest.raises(ConfigError, match=r"a batch of no known modality \(keys: waves\)"):
        model({"waves": torch.zeros(4, 8)})


def test_config_rejects_data_and_encoders_of_another_modality(series_modality, monkeypatch, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=rotation", "data.source=toyseries"])
    assert str(err.value) == "rotation trains on image data; data.source=toyseries is series data"
    assert main(["pretrain", "method.name=rotation", "data.source=toyseries"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "selfsup: error: rotation trains on image data; data.source=toyseries is series data"]
    # a method of several modalities takes the series, but not on an image encoder
    with pytest.raises(ConfigError, match=r"^backbone.name=resnet18 is an image encoder and data.source=toyseries is "
                                          r"series data; simclr on series needs a series encoder"):
        load_config(None, ["data.source=toyseries"])

    from selfsup import registry

    monkeypatch.setitem(registry.BACKBONES, "toy_series_net", lambda cfg: None)
    monkeypatch.setitem(registry.BACKBONE_MODALITIES, "toy_series_net", "series")
    with pytest.raises(ConfigError, match=r"^backbone.name=toy_series_net is an series encoder; mae trains on image$"):
        load_config(None, ["method.name=mae", "backbone.name=toy_series_net"])


def test_a_method_taking_several_modalities_reads_the_source_with_the_matching_reader(series_modality):
    assert M.modality_of_source("toyseries", ("image", "series")) == "series"
    M.check_source("data2vec_any", ("image", "series"), "toyseries")  # accepted: no error
    assert get_method("mae").modalities == ("image",) and get_method("simclr").modalities == ("image", "series")


# ----------------------------------------------------------------------------------- the user's data


class PilPairs(Dataset):
    """What a torchvision dataset gives: (PIL image, label) pairs, here 20 x 24 RGB."""

    def __init__(self, n: int = 48, broken: tuple[int, ...] = ()) -> None:
        rng = np.random.default_rng(0)
        self.pixels = rng.integers(0, 256, (n, 20, 24, 3), dtype=np.uint8)
        self.broken = broken

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        if index in self.broken:
            raise OSError(f"cannot read item {index}")
        return Image.fromarray(self.pixels[index]), index % 3


def _cfg(*extra: str):
    return load_config(None, [*TINY, "data.limit=null", "backbone.width=8", "eval.final_knn=false", "data.workers=0",
                              "trainer.epochs=2", *extra])


def test_fit_on_a_dataset_of_pil_pairs_resumes_exactly(tmp_path):
    mid, _ = resume_matches_straight(_cfg(), tmp_path, until_step=4, data=PilPairs())  # 3 steps an epoch
    assert mid["position"] == {"step": 4, "epoch": 1, "batch": 1}
    trainer = Trainer(_cfg(), run_dir=tmp_path / "summary")
    summary = trainer.fit(data=PilPairs(broken=(5,)))
    assert trainer.data_mode == "dataset" and summary["position"]["step"] == 6
    assert summary["data"]["skipped_images"] == 1 and summary["data"]["train_samples"] == 48


def test_fit_on_a_dataloader_of_batches_resumes_exactly(tmp_path):
    batches = DataLoader(PilPairs(), batch_size=16, collate_fn=lambda items: (
        torch.stack([torch.from_numpy(np.array(img)) for img, _ in items]),  # B x H x W x 3: channels last
        torch.tensor([label for _, label in items])))
    mid, _ = resume_matches_straight(_cfg(), tmp_path, until_step=4, data=batches)
    assert mid["position"]["step"] == 4
    trainer = Trainer(_cfg(), run_dir=tmp_path / "mode")
    trainer.attach_data(batches)
    assert trainer.data_mode == "iterable" and trainer.total_steps == 6
    with pytest.raises(ConfigError, match="already has its training data"):
        trainer.fit(data=batches)


def test_user_data_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="has no length, so no epochs: set trainer.max_steps"):
        Trainer(_cfg(), run_dir=tmp_path / "a").fit(data=(b for b in []))
    once = (torch.zeros(16, 3, 8, 8, dtype=torch.uint8) for _ in range(2))
    with pytest.raises(DataError, match="ended after 2 batches"):
        Trainer(_cfg("trainer.max_steps=3"), run_dir=tmp_path / "b").fit(data=once)
    with pytest.raises(ConfigError, match="hold 8 samples but each rank's share of data.batch_size is 16"):
        Trainer(_cfg(), run_dir=tmp_path / "c").fit(data=IterTwice(torch.zeros(8, 3, 8, 8)))

    class Tokens(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"tokens": torch.zeros(8, dtype=torch.long)}

    with pytest.raises(ConfigError, match="simclr takes image batches .* it was given a text batch"):
        Trainer(_cfg(), run_dir=tmp_path / "d").fit(data=Tokens())
    with pytest.raises(DataError, match=r"expected an image with 3 dims \(C, H, W\), got shape \(2, 3, 8, 8\)"):
        Trainer(_cfg(), run_dir=tmp_path / "e").fit(data=torch.utils.data.TensorDataset(torch.zeros(4, 2, 3, 8, 8)))


class IterTwice:
    """An iterable of two batches with a length, iterated as often as asked."""
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return 2

    def __iter__(self):
        return iter([self.batch, self.batch])


def test_backbones_give_features_before_pooling_that_pool_to_their_output():
    """``forward_features`` in timm's sense: a ResNet's last map (mean-pooled: its output), a ViT's
    normed tokens (CLS: its output), a timm model's own forward_features."""
    from selfsup.backbones import build_backbone
    from selfsup.config import BackboneConfig

    x = torch.randn(2, 3, 32, 32)
    for cfg in (BackboneConfig(name="resnet18", width=8), BackboneConfig(name="vit_tiny", img_size=32, patch_size=8,
                                                                          depth=1, embed_dim=32, num_heads=2),
                BackboneConfig(name="timm:resnet10t")):
        net = build_backbone(cfg).eval()
        with torch.no_grad():
            feats, out = net.forward_features(x), net(x)
        pooled = feats[:, 0] if feats.ndim == 3 else feats.mean(dim=(2, 3))
        assert out.shape == (2, net.out_dim) and torch.allclose(pooled, out, atol=1e-5), cfg.name
    assert build_backbone(BackboneConfig(name="vit_tiny", img_size=32, patch_size=8, depth=1, embed_dim=32,
                                         num_heads=2)).forward_features(x).shape == (2, 1 + 16, 32)
