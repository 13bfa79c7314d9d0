"""The two-view methods on series: jitter / scaling / permutation views (pretext.series_augment) and
SimCLR, MoCo v2/v3, BYOL, SimSiam, Barlow Twins and VICReg on a series encoder."""

import pytest
import torch

from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.errors import ConfigError
from selfsup.pretext.series_augment import SERIES_STRONG, SERIES_WEAK, SeriesAugment, SeriesViewConfig, permute_segments

TWO_VIEW = ("simclr", "mocov2", "mocov3", "byol", "simsiam", "barlow_twins", "vicreg")


def series_run(tmp_path, method: str, *extra: str) -> list[str]:
    """A tiny run of ``method`` on the embedded ETTh1 (windows of 32 steps) with a small TS2Vec encoder."""
    return [f"method.name={method}", "data.source=embedded-series", "data.seq_len=32", "data.batch_size=8",
            "backbone.name=ts2vec", "backbone.width=8", "backbone.embed_dim=16", "backbone.depth=2",
            "optim.name=adamw", "optim.lr=1e-3", "optim.lr_scaling=none", "optim.warmup_epochs=0",
            "trainer.progress=false", "trainer.precision=32", "trainer.device=cpu", f"trainer.out_dir={tmp_path}",
            "eval.final_knn=false", *extra]


def test_permutation_moves_whole_segments_the_same_way_in_every_channel():
    torch.manual_seed(0)
    base = torch.arange(50, dtype=torch.float32).expand(400, 50)
    x = torch.stack([base, base + 1000], 1)  # (400, 2, 50): channel 1 = channel 0 + 1000
    y = permute_segments(x, 8)
    assert torch.equal(y[:, 1], y[:, 0] + 1000)  # one permutation for the whole series
    assert torch.equal(y[:, 0].sort(1).values, base)  # a permutation of the steps
    jumps = (y[:, 0].diff(1) != 1).sum(1)  # segment boundaries in the output
    assert int(jumps.max()) <= 6 and int(jumps.min()) == 0  # at most 7 segments; some series left whole
    assert torch.equal(permute_segments(x, 2), x) and torch.equal(permute_segments(x, 0), x)  # 1 segment: unchanged
    seen = set(jumps.tolist())
    assert seen >= {0, 1, 2, 3, 4, 5}  # every segment count occurs (a shuffle may rejoin neighbours)


def test_scaling_and_jitter_follow_their_config():
    torch.manual_seed(1)
    ones = torch.ones(2000, 3, 40)
    per_channel = SeriesAugment(SeriesViewConfig(scale_mean=2.0, scale_sigma=0.5))(ones)
    assert torch.equal(per_channel, per_channel[..., :1].expand_as(per_channel))  # one factor per (series, channel)
    assert float(per_channel[..., 0].mean()) == pytest.approx(2.0, abs=0.03)
    assert float(per_channel[..., 0].std()) == pytest.approx(0.5, abs=0.03)
    per_step = SeriesAugment(SERIES_WEAK)(ones)  # TS-TCC's code: one factor per (series, step), all channels
    assert torch.equal(per_step, per_step[:, :1].expand_as(per_step))
    assert float(per_step.std()) == pytest.approx(1.1, abs=0.03)
    jittered = SeriesAugment(SeriesViewConfig(jitter_sigma=0.8))(torch.zeros(500, 3, 40))
    assert float(jittered.mean()) == pytest.approx(0.0, abs=0.02) and float(jittered.std()) == pytest.approx(0.8, abs=0.02)
    strong = SeriesAugment(SERIES_STRONG)(ones)
    assert float((strong - 1).std()) == pytest.approx(0.8, abs=0.02)
    assert torch.equal(SeriesAugment(SeriesViewConfig())(ones), ones)  # every step off by default
    with pytest.raises(ConfigError, match="augment.series.0: scale_per"):
        load_config(None, ["augment.series.0.scale_per=time"])


@pytest.mark.parametrize("name", TWO_VIEW)
def test_every_two_view_method_trains_on_series(tmp_path, name):
    from selfsup.data.series import long_series_split

    cfg = load_config(None, series_run(tmp_path, name))
    method = build_method(cfg)
    assert method.series and method.unit == "series" and "series" in method.modalities
    x = long_series_split("embedded-series", "train", 32).gather(torch.arange(8))["series"]
    torch.manual_seed(0)
    v1, v2 = method.make_views({"series": x})
    assert v1.shape == v2.shape == x.shape and not torch.equal(v1, v2)
    loss, metrics = method({"series": x})
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    method.eval()
    with torch.no_grad():
        assert method.encode(x).shape == (8, 16) and torch.equal(method.embed({"series": x}), method.encode(x))
    with pytest.raises(ConfigError, match="takes series batches"):
        method({"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)})
    with pytest.raises(ConfigError, match=r"series batches are float \(B, C, T\), got \(8, 32\)"):
        method({"series": x[:, 0]})


def test_a_two_view_run_on_series_resumes_exactly(tmp_path):
    from tests.conftest import resume_matches_straight

    resume_matches_straight(load_config(None, series_run(tmp_path, "simclr", "trainer.max_steps=4")), tmp_path,
                            until_step=2)


def test_encoder_and_data_must_agree(tmp_path):
    with pytest.raises(ConfigError, match="backbone.name=resnet18 is an image encoder and data.source=embedded-series "
                                          "is series data; simclr on series needs a series encoder"):
        load_config(None, series_run(tmp_path, "simclr", "backbone.name=resnet18"))
    with pytest.raises(ConfigError, match="PatchTST gives one per channel"):
        build_method(load_config(None, series_run(tmp_path, "vicreg", "backbone.name=patchtst", "backbone.patch_size=8")))
    image = build_method(load_config(None, ["method.name=simclr", "backbone.name=resnet18", "backbone.cifar_stem=true"]))
    assert not image.series and image.unit == "images"
    with pytest.raises(ConfigError, match="takes image batches"):
        image.make_views({"series": torch.zeros(2, 3, 32)})
