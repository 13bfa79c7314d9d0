"""Time series: the data (splits, windows, normalization, readers), the shared 1-D masks, the
PatchTST encoder and its masked-patch pretraining, forecasting with a frozen encoder, and the CLI."""

import gzip
import json
import math

import numpy as np
import pytest
import torch

from selfsup.backbones.series import PatchTST, instance_norm, patch_count
from selfsup.config import load_config
from selfsup.data.series import (
    EMBEDDED_SERIES,
    EMBEDDED_SERIES_FILE,
    forecast_windows,
    is_series_source,
    long_series_split,
    read_long_csv,
    read_ts,
    series_set,
    split_rows,
)
from selfsup.errors import DataError
from selfsup.pretext.masking import future_masking, random_masking, sequence_mask, span_masking

ETT_TRAIN, ETT_VAL, ETT_TEST = 8640, 2880, 2880


def tiny_series(tmp_path, *extra: str) -> list[str]:
    """Overrides for a tiny PatchTST run on the embedded ETTh1: windows of 48 steps, patches of 8,
    a 16-wide 1-block encoder, batch 8."""
    return ["method.name=patchtst", f"data.source={EMBEDDED_SERIES}", "data.seq_len=48", "data.batch_size=8",
            "data.eval_batch_size=512", "backbone.name=patchtst", "backbone.patch_size=8", "backbone.embed_dim=16",
            "backbone.depth=1", "backbone.num_heads=2", "backbone.dropout=0.1", "optim.name=adamw", "optim.lr=1e-3",
            "optim.lr_scaling=none", "optim.warmup_epochs=0", "optim.weight_decay=0.0", "trainer.progress=false",
            "trainer.precision=32", "trainer.device=cpu", f"trainer.out_dir={tmp_path / 'runs'}",
            "eval.final_knn=false", *extra]


# --------------------------------------------------------------------------------------
# data


def test_the_embedded_file_is_etth1_unmodified():
    """CC BY-ND: the package ships ETTh1.csv only compressed, its bytes unchanged."""
    with gzip.open(EMBEDDED_SERIES_FILE, "rb") as fh:
        data = fh.read()
    import hashlib

    assert hashlib.sha256(data).hexdigest() == "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066"
    assert (EMBEDDED_SERIES_FILE.parent / "ETDataset-LICENSE").is_file()
    series = read_long_csv(EMBEDDED_SERIES)
    assert series.values.shape == (17420, 7) and series.dropped == ("date",)
    assert series.columns == ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")


def test_ett_and_generic_chronological_splits():
    assert split_rows("ETTh1.csv", 17420, 512) == {"train": (0, 8640), "val": (8640 - 512, 11520),
                                                   "test": (11520 - 512, 14400)}
    assert split_rows("ETTm2.csv", 69680, 96)["test"] == (46080 - 96, 57600)  # 15-minute rows: 4x
    assert split_rows("weather.csv", 1000, 10) == {"train": (0, 700), "val": (690, 800), "test": (790, 1000)}
    with pytest.raises(DataError, match="12/4/4"):
        split_rows("ETTh1.csv", 9000, 96)


@pytest.mark.parametrize("horizon", [1, 96])
def test_no_future_value_leaks_into_a_context_or_across_splits(horizon):
    """Every val/test target lies in its own split, every context ends where its target begins, and no
    training window (context or target) reaches a validation row."""
    L = 64
    raw = read_long_csv(EMBEDDED_SERIES).values
    mean, std = raw[:ETT_TRAIN].mean(0), raw[:ETT_TRAIN].std(0)
    bounds = {"train": (0, ETT_TRAIN), "val": (ETT_TRAIN, ETT_TRAIN + ETT_VAL),
              "test": (ETT_TRAIN + ETT_VAL, ETT_TRAIN + ETT_VAL + ETT_TEST)}
    for split, (lo, hi) in bounds.items():
        w = forecast_windows(EMBEDDED_SERIES, split, L, horizon)
        first, last = int(w.starts[0]), int(w.starts[-1])
        target_rows = (first + L, last + L + horizon - 1)
        assert target_rows == (lo if split != "train" else L, hi - 1), split  # targets fill the split, no more
        assert len(w) == hi - (lo if split == "train" else lo - L) - L - horizon + 1
        batch = w.gather(torch.tensor([0, len(w) - 1]))
        for i, start in enumerate((first, last)):  # the values are those rows, standardized with train stats
            want_ctx = (raw[start:start + L] - mean) / std
            want_tgt = (raw[start + L:start + L + horizon] - mean) / std
            assert np.allclose(batch["series"][i].T.numpy(), want_ctx, atol=1e-5)
            assert np.allclose(batch["target"][i].T.numpy(), want_tgt, atol=1e-5)
    pre = long_series_split(EMBEDDED_SERIES, "train", L)  # pretraining windows: inside the train rows
    assert int(pre.starts[-1]) + L == ETT_TRAIN


def test_normalization_is_fitted_on_the_training_split_only(tmp_path):
    with gzip.open(EMBEDDED_SERIES_FILE, "rt") as fh:
        raw = fh.read().splitlines()
    train = long_series_split(EMBEDDED_SERIES, "train", 32)
    x = train.values[:ETT_TRAIN]
    assert torch.allclose(x.mean(0), torch.zeros(7), atol=1e-4) and torch.allclose(x.std(0, unbiased=False),
                                                                                    torch.ones(7), atol=1e-4)
    # scale every row after the training split by 10: the training windows do not change
    edited = [raw[0]] + raw[1:ETT_TRAIN + 1] + [
        ",".join([r.split(",")[0]] + [str(float(v) * 10) for v in r.split(",")[1:]]) for r in raw[ETT_TRAIN + 1:]]
    path = tmp_path / "ETTh1.csv"
    path.write_text("\n".join(edited) + "\n")
    again = long_series_split(str(path), "train", 32)
    assert torch.allclose(again.values[:ETT_TRAIN], x, atol=1e-6)
    test = long_series_split(str(path), "test", 32)
    assert not torch.allclose(test.values[ETT_TRAIN:], long_series_split(EMBEDDED_SERIES, "test", 32).values[ETT_TRAIN:])


def test_bad_csvs_are_clear_errors(tmp_path):
    gap = tmp_path / "gap.csv"
    gap.write_text("date,a,b\n" + "".join(f"2020-01-{i:02d},{i},{'' if i == 5 else i}\n" for i in range(1, 20)))
    with pytest.raises(DataError, match="1 missing or non-finite values in b"):
        read_long_csv(str(gap))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b\n1,2\n3\n4,5\n")
    with pytest.raises(DataError, match="do not have the header's 2 fields"):
        read_long_csv(str(ragged))
    with pytest.raises(DataError, match="not found"):
        read_long_csv(str(tmp_path / "nope.csv"))


def test_a_long_series_in_parquet_reads_as_its_csv(tmp_path):
    """ETTh1 written as Parquet (the date a string column) gives the CSV's values, columns and ETT split."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from selfsup.data.series import is_long_series

    ett = read_long_csv(EMBEDDED_SERIES)
    table = {"date": pa.array([f"row{i}" for i in range(len(ett.values))])}
    table.update({c: pa.array(ett.values[:, k]) for k, c in enumerate(ett.columns)})
    path = tmp_path / "ETTh1.parquet"
    pq.write_table(pa.table(table), path)
    got = read_long_csv(str(path))
    assert is_series_source(str(path)) and is_long_series(str(path))
    assert got.columns == ett.columns and got.dropped == ("date",) and np.array_equal(got.values, ett.values)
    windows = long_series_split(str(path), "test", 32)
    assert windows.values.shape == long_series_split(EMBEDDED_SERIES, "test", 32).values.shape  # ETT's months

    pq.write_table(pa.table({"a": pa.array([1.0, None, 3.0]), "b": pa.array([1, 2, 3])}), tmp_path / "gap.parquet")
    with pytest.raises(DataError, match="1 missing or non-finite values in a"):
        read_long_csv(str(tmp_path / "gap.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_long_csv(str(tmp_path / "junk.parquet"))


TS_FILE = """# a tiny UEA-style file
@problemName Tiny
@univariate false
@dimensions 2
@equalLength false
@classLabel true b a
@data
1,2,3,4:0,0,1,1:b
2,3,4,5:1,1,0,0:a
4,3,2:5,5,5:b
"""


def test_ts_reader_pads_shorter_series_and_sorts_labels(tmp_path):
    (tmp_path / "Tiny_TRAIN.ts").write_text(TS_FILE)
    (tmp_path / "Tiny_TEST.ts").write_text(TS_FILE.replace("4,3,2:5,5,5:b", "0,0,0,0:2,2,2,2:a"))
    raw = read_ts(tmp_path / "Tiny_TRAIN.ts")
    assert raw.x.shape == (3, 2, 4) and raw.labels == ["b", "a", "b"] and raw.padded == 1
    assert raw.x[2].tolist() == [[4, 3, 2, 2], [5, 5, 5, 5]]  # padded with the last value
    assert is_series_source(str(tmp_path))
    train, test = series_set(str(tmp_path), "train"), series_set(str(tmp_path), "test")
    assert train.classes == ["a", "b"] and train.labels.tolist() == [1, 0, 1] and test.labels.tolist() == [1, 0, 0]
    mean = raw.x.mean(axis=(0, 2), keepdims=True)
    std = raw.x.std(axis=(0, 2), keepdims=True)
    assert np.allclose(train.x.numpy(), (raw.x - mean) / std, atol=1e-6)  # per channel, train statistics
    assert np.allclose(test.x[2].numpy(), ((np.array([[0, 0, 0, 0], [2, 2, 2, 2]]) - mean) / std)[0], atol=1e-6)
    assert "1 shorter series padded" in train.note


def test_npz_sets_and_their_errors(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "set.npz"
    np.savez(path, x_train=rng.normal(size=(6, 3, 20)), y_train=np.array([0, 1] * 3),
             x_test=rng.normal(size=(4, 3, 20)), y_test=np.array([1, 0, 1, 0]))
    train, test = series_set(str(path), "train"), series_set(str(path), "test")
    assert train.x.shape == (6, 3, 20) and test.labels.tolist() == [1, 0, 1, 0] and train.classes == ["0", "1"]
    np.save(tmp_path / "flat.npy", rng.normal(size=(5, 30)))  # (N, T): one channel, no labels
    flat = series_set(str(tmp_path / "flat.npy"), "train")
    assert flat.x.shape == (5, 1, 30) and not flat.has_labels
    np.savez(tmp_path / "bad.npz", series=np.zeros((2, 3)))
    with pytest.raises(DataError, match="needs 'x'"):
        series_set(str(tmp_path / "bad.npz"), "train")


def test_ucr_sets_from_the_sktime_wheel():
    pytest.importorskip("sktime")
    train, test = series_set("ucr:GunPoint", "train"), series_set("ucr:GunPoint", "test")
    assert (len(train), len(test), train.channels, train.length) == (50, 150, 1, 150)
    assert train.classes == ["1", "2"] and train.has_labels
    motions = series_set("ucr:BasicMotions", "train")
    assert motions.x.shape == (40, 6, 100) and len(motions.classes) == 4
    with pytest.raises(DataError, match="sktime ships no UCR/UEA set 'Nope'"):
        series_set("ucr:Nope", "train")


# --------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("n,ratio", [(42, 0.4), (10, 0.5), (7, 0.75), (5, 0.1)])
def test_1d_masks_mask_the_stated_count_in_their_layout(n, ratio):
    masked = n - int(n * (1 - ratio))
    gen = torch.Generator().manual_seed(0)
    rand = random_masking(64, n, ratio, generator=gen).mask
    assert (rand.sum(1) == masked).all() and rand.float().mean(0).min() > 0  # every position gets masked sometimes
    spans = span_masking(64, n, ratio, 3, generator=gen)
    assert (spans.sum(1) == masked).all()
    # spans: runs of masked patches are sums of whole spans (3, 3, ..., the last shorter one)
    last = masked - 3 * (math.ceil(masked / 3) - 1)
    for row in spans.tolist():
        runs = [len(r) for r in "".join("1" if v else "0" for v in row).split("0") if r]
        assert sum(runs) == masked
        assert all(r % 3 in (0, last % 3) for r in runs)
    future = future_masking(4, n, ratio)
    assert future[:, n - masked:].all() and not future[:, : n - masked].any()
    assert torch.equal(sequence_mask("future", 4, n, ratio), future)


def test_span_masking_layout_is_uniform_over_positions():
    mask = span_masking(20000, 12, 0.5, 2, generator=torch.Generator().manual_seed(1))
    freq = mask.float().mean(0)
    assert freq.min() > 0.25 and freq.max() < 0.75  # no position is (almost) always or never masked
    assert torch.allclose(freq, freq.flip(0), atol=0.02)  # and the layout has no direction


# --------------------------------------------------------------------------------------
# encoder and method


def test_patchify_matches_the_official_create_patch():
    enc = PatchTST(max_len=50, patch_size=12, patch_stride=12, embed_dim=16, depth=1, num_heads=2)
    x = torch.arange(2 * 3 * 50, dtype=torch.float32).view(2, 3, 50)
    p = enc.patchify(x)
    assert p.shape == (2, 3, patch_count(50, 12, 12), 12) == (2, 3, 4, 12)
    assert torch.equal(p[0, 0, 0], x[0, 0, 2:14]) and torch.equal(p[1, 2, -1], x[1, 2, 38:50])  # drops the first 2
    overlap = PatchTST(max_len=50, patch_size=16, patch_stride=8, embed_dim=16, depth=1, num_heads=2)
    assert overlap.patchify(x).shape[2] == (50 - 16) // 8 + 1


def test_instance_norm_is_revin_without_affine_and_inverts():
    x = torch.randn(3, 2, 40) * 5 + 7
    y, mean, std = instance_norm(x)
    assert torch.allclose(y.mean(-1), torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(std, torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5))
    assert torch.allclose(y * std + mean, x, atol=1e-5)


def test_channels_are_encoded_independently():
    """Channel independence: in eval mode a channel's tokens do not depend on the other channels."""
    torch.manual_seed(0)
    enc = PatchTST(max_len=48, patch_size=8, embed_dim=16, depth=2, num_heads=2).eval()
    x = torch.randn(2, 4, 48)
    with torch.no_grad():
        full = enc.tokens(x)
        alone = enc.tokens(x[:, 2:3])
        swapped = enc.tokens(torch.cat([x[:, :2], torch.randn(2, 2, 48)], 1))
    assert full.shape == (2, 4, 6, 16)
    assert torch.allclose(full[:, 2:3], alone, atol=1e-5)
    assert torch.allclose(full[:, :2], swapped[:, :2], atol=1e-5)
    assert enc(x).shape == (2, 4 * 16)


def test_masked_patch_loss_against_a_hand_computed_case(tmp_path):
    """PatchTST's loss: per patch the mean squared error over its steps, averaged over masked patches only."""
    from selfsup.losses import mae_loss

    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]]])  # (1, N=3, P=2)
    target = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [1.0, 2.0]]])
    mask = torch.tensor([[True, False, True]])
    # masked patches 0 and 2: ((1 + 4) / 2 + (4 + 1) / 2) / 2 = 2.5; the visible one (25) does not count
    assert float(mae_loss(pred, target, mask, norm_pix_loss=False)) == pytest.approx(2.5)

    from selfsup.core.build import build_method

    method = build_method(load_config(None, tiny_series(tmp_path)))
    x = torch.randn(2, 3, 48)
    torch.manual_seed(5)
    out = method({"series": x})
    torch.manual_seed(5)
    target, inputs, mask = method.masked_inputs(x)
    assert (mask.sum(-1) == 6 - int(6 * 0.6)).all()  # 40% of 6 patches: 3 per channel
    assert (inputs[mask] == 0).all() and torch.equal(inputs[~mask], target[~mask])
    pred = method.head(method.backbone.encode_patches(inputs))
    torch.manual_seed(5)
    want = ((pred - target).pow(2).mean(-1) * mask).sum() / mask.sum()
    assert float(out.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)


# --------------------------------------------------------------------------------------
# training, resuming, forecasting, export


def test_patchtst_resumes_exactly(tmp_path):
    from tests.conftest import resume_matches_straight

    cfg = load_config(None, tiny_series(tmp_path, "trainer.max_steps=6"))
    resume_matches_straight(cfg, tmp_path, until_step=3)


def test_pretrain_then_forecast_from_the_cli(tmp_path, capsys):
    """The CLI trains PatchTST on the embedded ETTh1, ends with a forecast beside the random-init
    encoder and the input-window baseline; `eval forecast` scores a chosen horizon; export loads back."""
    from selfsup.cli import main
    from selfsup.export import load_encoder

    over = tiny_series(tmp_path, "trainer.max_steps=30", "trainer.run_name=r", "eval.final_knn=true",
                       "eval.random_init_seeds=1", "eval.forecast_epochs=2", "eval.forecast_horizons=[24]")
    assert main(["pretrain", *over]) == 0
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    row = summary["forecast"]["horizons"]["24"]
    assert row["windows"] == {"train": ETT_TRAIN - 48 - 24 + 1, "val": ETT_VAL - 24 + 1, "test": ETT_TEST - 24 + 1}
    for key in ("encoder", "input_linear"):
        assert 0 < row[key]["mse"] < 2 and 0 < row[key]["mae"] < 2
    assert row["random_init"]["seeds"] == [0] and 0 < row["random_init"]["mse"] < 2
    assert "forecast H=24 encoder" in capsys.readouterr().out

    run = tmp_path / "runs" / "r"
    assert main(["eval", "forecast", "--checkpoint", str(run), "--horizons", "12", "--epochs", "1",
                 "--device", "cpu"]) == 0
    result = json.loads((run / "eval_forecast.json").read_text())
    assert list(result["horizons"]) == ["12"] and result["seq_len"] == 48
    assert (run / "eval_forecast.png").stat().st_size > 10_000  # the context, the truth and both forecasts

    for verb, says in (("finetune", "fine-tuning has recipes for image and text encoders; patchtst is a series"),
                       ("perplexity", "perplexity scores language models")):
        assert main(["eval", verb, "--checkpoint", str(run), "--device", "cpu"]) == 2
        assert says in capsys.readouterr().err

    assert main(["export", str(run), str(tmp_path / "enc.safetensors")]) == 0
    enc = load_encoder(tmp_path / "enc.safetensors")
    from selfsup.evaluate import load_method

    method, _, _ = load_method(run)
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        assert torch.allclose(enc.eval()(x), method.encode(x), atol=1e-5)


def test_a_series_method_refuses_other_data_and_encoders(tmp_path):
    from selfsup.errors import ConfigError

    with pytest.raises(ConfigError, match="patchtst trains on series data; data.source=embedded is image data"):
        load_config(None, tiny_series(tmp_path, "data.source=embedded"))
    with pytest.raises(ConfigError, match="backbone.name=resnet18 is an image encoder; patchtst trains on series"):
        load_config(None, tiny_series(tmp_path, "backbone.name=resnet18"))


# --------------------------------------------------------------------------------------
# TS2Vec


def test_ts2vec_loss_against_hand_computed_cases():
    from selfsup.losses import hierarchical_contrastive_loss

    e = math.e
    # B = 2, T = 1: the instance loss only (level 0 is the last); rows 1, 0 | 1, 2 of the two views
    z1, z2 = torch.tensor([[[1.0]], [[0.0]]]), torch.tensor([[[1.0]], [[2.0]]])
    inst = (2 * (math.log(1 + e + e**2) - 1) + math.log(3) + math.log(1 + 2 * e**2)) / 4
    assert float(hierarchical_contrastive_loss(z1, z2)) == pytest.approx(0.5 * inst, rel=1e-6)
    # B = 1, T = 2: the temporal loss at level 0 (no other series to contrast), then one pooled level
    z1, z2 = torch.tensor([[[1.0], [0.0]]]), torch.tensor([[[0.5], [1.0]]])
    temp = ((math.log(1 + e**0.5 + e) - 0.5) + math.log(3) + (math.log(2 * e**0.5 + 1) - 0.5)
            + math.log(e + 1 + e**0.5)) / 4
    assert float(hierarchical_contrastive_loss(z1, z2)) == pytest.approx(0.5 * temp / 2, rel=1e-6)


def test_ts2vec_crops_share_the_overlap():
    from selfsup.methods.ts2vec import draw_crops, take_per_row

    torch.manual_seed(0)
    x = torch.arange(40.0).repeat(8, 2, 1) + 100 * torch.arange(8.0)[:, None, None]  # (8, 2, 40): step index
    for _ in range(50):
        s1, s2, len1, len2, overlap = draw_crops(8, 40)
        assert 2 <= overlap <= min(len1, len2) and ((s1 >= 0) & (s1 + len1 <= 40) & (s2 >= 0) & (s2 + len2 <= 40)).all()
        v1, v2 = take_per_row(x, s1, len1), take_per_row(x, s2, len2)
        assert torch.equal(v1[..., -overlap:], v2[..., :overlap])  # view 1 ends, view 2 starts, with the overlap


TS2VEC_TINY = ["method.name=ts2vec", "backbone.name=ts2vec", "backbone.width=8", "backbone.embed_dim=16",
               "backbone.depth=3", "data.batch_size=4", "data.eval_batch_size=64", "optim.name=adamw", "optim.lr=1e-3",
               "optim.lr_scaling=none", "optim.warmup_epochs=0", "trainer.progress=false", "trainer.precision=32",
               "trainer.device=cpu", "eval.final_knn=false"]


def test_ts2vec_trains_on_a_set_and_encodes_with_the_weight_average(tmp_path):
    from selfsup.core.build import build_method

    pytest.importorskip("sktime")
    cfg = load_config(None, [*TS2VEC_TINY, "data.source=ucr:BasicMotions", f"trainer.out_dir={tmp_path}"])
    method = build_method(cfg)
    assert method.backbone.in_chans == 6  # fixed from the data
    x = series_set("ucr:BasicMotions", "train").x[:4]
    start = [p.clone() for p in method.backbone.parameters()]
    opt = torch.optim.SGD(method.backbone.parameters(), lr=0.1)
    snapshots = []
    for _ in range(2):
        loss, _ = method({"series": x})
        loss.backward()
        opt.step()
        opt.zero_grad()
        method.on_step_end(None)
        snapshots.append([p.clone() for p in method.backbone.parameters()])
    for avg, p0, p1, p2 in zip(method.average.parameters(), start, *snapshots):
        assert torch.allclose(avg, (p0 + p1 + p2) / 3, atol=1e-6)  # the initial weights and every step's
    method.eval()
    with torch.no_grad():
        assert torch.equal(method.encode(x), method.average(x)) and method.encode(x).shape == (4, 16)


def test_ts2vec_resumes_exactly_and_forecasts(tmp_path):
    from tests.conftest import resume_matches_straight

    from selfsup.eval.forecast import forecast_probe

    cfg = load_config(None, [*TS2VEC_TINY, f"data.source={EMBEDDED_SERIES}", "data.seq_len=32", "trainer.max_steps=4",
                             f"trainer.out_dir={tmp_path}"])
    resume_matches_straight(cfg, tmp_path, until_step=2)
    from selfsup.core.build import build_method

    result = forecast_probe(build_method(cfg).eval(), cfg, device=torch.device("cpu"), horizons=(8,), epochs=1,
                            lrs=(1e-3,), baseline=False)
    assert 0 < result["horizons"]["8"]["encoder"]["mse"] < 3  # a joint head: 16 features -> 7 x 8 values


@pytest.mark.parametrize("length,dilation", [(150, 256), (150, 1024), (600, 512), (20, 16)])
def test_ts2vec_conv_skips_only_taps_that_read_padding(length, dilation):
    """The shortcut for dilations past the series length gives the full dilated conv's output."""
    from selfsup.backbones.series import _SamePadConv

    torch.manual_seed(0)
    conv = _SamePadConv(8, 8, 3, dilation)
    x = torch.randn(2, 8, length)
    assert torch.allclose(conv(x), conv.conv(x), atol=1e-5)


# --------------------------------------------------------------------------------------
# TS-JEPA


def test_jepa_l1_loss_against_a_hand_computed_case():
    from selfsup.losses import jepa_l1_loss

    pred = torch.tensor([[[1.0, -2.0], [0.5, 0.0]]], requires_grad=True)  # (1, 2 tokens, 2 features)
    target = torch.tensor([[[0.0, 1.0], [0.5, -4.0]]], requires_grad=True)
    # |1| + |-3| + |0| + |4| = 8 over 4 values
    loss = jepa_l1_loss(pred, target)
    assert float(loss.detach()) == pytest.approx(2.0)
    loss.backward()
    assert torch.equal(pred.grad, torch.tensor([[[1.0, -1.0], [0.0, 1.0]]]) / 4) and target.grad is None
    with pytest.raises(ValueError, match="differ"):
        jepa_l1_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def tiny_jepa(tmp_path, *extra: str) -> list[str]:
    return tiny_series(tmp_path, "method.name=ts_jepa", "method.pred_dim=16", "backbone.dropout=0.0",
                       "data.seq_len=80", *extra)  # 10 patches of 8


def test_ts_jepa_step_is_the_paper_objective(tmp_path):
    """The loss is the L1 between the predictor's outputs at the hidden patches and the EMA target's
    layer-normed tokens there; the context encoder never reads a hidden patch."""
    import torch.nn.functional as F

    from selfsup.core.build import build_method
    from selfsup.nn.predictors import gather_tokens

    method = build_method(load_config(None, tiny_jepa(tmp_path)))
    x = torch.randn(2, 3, 80)
    torch.manual_seed(3)
    out = method({"series": x})
    torch.manual_seed(3)
    keep, hidden = method.masks(6, 10, x.device)
    assert keep.shape == (6, 3) and hidden.shape == (6, 7)  # 70% of 10 patches hidden in each channel
    assert torch.equal(torch.cat([keep, hidden], 1).sort(1).values, torch.arange(10).expand(6, 10))
    patches = method.backbone.patchify(instance_norm(x)[0])
    with torch.no_grad():
        h = method.target_backbone.encode_patches(patches).flatten(0, 1)
        target = gather_tokens(F.layer_norm(h, (16,)), hidden)
        z = method.backbone.encode_patches(patches, keep=keep.view(2, 3, -1)).flatten(0, 1)
        want = (method.predictor(z, keep, [hidden]) - target).abs().mean()
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-5)

    # token dropping: garbage in the hidden patches changes nothing the context encoder returns
    spoiled = patches.clone().flatten(0, 1)
    spoiled.scatter_(1, hidden.unsqueeze(-1).expand(-1, -1, 8), 1e3)
    with torch.no_grad():
        z2 = method.backbone.encode_patches(spoiled.view_as(patches), keep=keep.view(2, 3, -1)).flatten(0, 1)
    assert torch.allclose(z, z2, atol=1e-5)


def test_ts_jepa_future_mask_hides_the_last_patches_and_ema_follows_the_official_schedule(tmp_path):
    from selfsup.core.build import build_method
    from selfsup.core.method import Progress

    method = build_method(load_config(None, tiny_jepa(tmp_path, "method.mask=future")))
    keep, hidden = method.masks(4, 10, torch.device("cpu"))
    assert torch.equal(hidden, torch.arange(3, 10).expand(4, 7)) and torch.equal(keep, torch.arange(3).expand(4, 3))
    # m_i = 0.998 + i (1 - 0.998) / (1.25 x total steps), i the update index from 0
    assert method.momentum(Progress(1, 100, 0, 1, 100)) == pytest.approx(0.998)
    assert method.momentum(Progress(101, 100, 0, 1, 100)) == pytest.approx(0.998 + 0.002 * 100 / 125)
    before = [p.clone() for p in method.target_backbone.parameters()]
    for p in method.backbone.parameters():
        p.data.add_(1.0)
    method.on_step_end(Progress(1, 100, 0, 1, 100))
    for t, b, s in zip(method.target_backbone.parameters(), before, method.backbone.parameters()):
        assert torch.allclose(t, 0.998 * b + 0.002 * s, atol=1e-6)
    target = build_method(load_config(None, tiny_jepa(tmp_path, "method.eval_encoder=target")))
    assert target.encoder is target.target_backbone and method.encoder is method.backbone


def test_ts_jepa_resumes_exactly_and_refuses_what_it_cannot_train(tmp_path):
    from tests.conftest import resume_matches_straight

    from selfsup.errors import ConfigError

    resume_matches_straight(load_config(None, tiny_jepa(tmp_path, "trainer.max_steps=6")), tmp_path, until_step=3)
    with pytest.raises(ConfigError, match="ts_jepa trains a patch encoder"):
        from selfsup.core.build import build_method

        build_method(load_config(None, tiny_jepa(tmp_path, "backbone.name=ts2vec", "backbone.width=8")))
    with pytest.raises(ConfigError, match="must be in"):
        load_config(None, tiny_jepa(tmp_path, "method.mask_ratio=1.0"))


def test_sincos_1d_positions_against_a_hand_computed_case():
    from selfsup.nn.positions import sincos_1d_pos_embed

    # dim 4: omega = 1, 1/100; position x -> [sin x, sin x/100, cos x, cos x/100]
    got = sincos_1d_pos_embed(4, 3)
    want = torch.tensor([[math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100)] for x in range(3)])
    assert got.shape == (1, 3, 4) and torch.allclose(got[0], want, atol=1e-7)
    with pytest.raises(ValueError, match="even dim"):
        sincos_1d_pos_embed(5, 3)


def test_ts_jepa_on_a_labeled_set_then_the_svm_probe_from_the_cli(tmp_path, capsys):
    """TS-JEPA trains on a .npz set from the CLI; `eval svm` fits TS2Vec's RBF SVM (C searched: 60
    training series of 2 classes) on its pooled features and scores the test series."""
    from selfsup.cli import main

    rng = np.random.default_rng(0)
    ramp = np.linspace(-1, 1, 40)

    def make(n):
        y = np.arange(n) % 2
        x = rng.normal(scale=0.3, size=(n, 2, 40)) + (2 * y - 1)[:, None, None] * ramp  # falling or rising
        return x.astype(np.float32), y

    (xa, ya), (xb, yb) = make(60), make(20)
    np.savez(tmp_path / "set.npz", x_train=xa, y_train=ya, x_test=xb, y_test=yb)
    over = tiny_jepa(tmp_path, f"data.source={tmp_path / 'set.npz'}", "trainer.max_steps=3", "trainer.run_name=j")
    assert main(["pretrain", *over]) == 0
    run = tmp_path / "runs" / "j"
    assert main(["eval", "svm", "--checkpoint", str(run), "--device", "cpu"]) == 0
    result = json.loads((run / "eval_svm.json").read_text())
    assert result["train_samples"] == 60 and result["test_samples"] == 20 and result["searched"] is True
    assert result["top1"] >= 90  # rising or falling: each patch's slope tells, even averaged over patches
    assert "saved" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# forecasting pretext


def tiny_forecast(tmp_path, *extra: str) -> list[str]:
    """80-step windows in 10 patches of 8: the last 24 steps (3 patches) the future."""
    return tiny_series(tmp_path, "method.name=ts_forecast", "method.horizon=24", "method.pred_dim=16",
                       "backbone.dropout=0.0", "method.head_dropout=0.0", "data.seq_len=80", *extra)


def test_forecast_pretext_value_loss_and_no_future_in_the_context(tmp_path):
    from selfsup.core.build import build_method
    from selfsup.methods.ts_forecast import context_norm

    method = build_method(load_config(None, tiny_forecast(tmp_path)))
    assert (method.context_patches, method.future_patches) == (7, 3)
    x = torch.randn(2, 3, 80)
    out = method({"series": x})
    # by hand: normalize with the first 56 steps' mean and std, encode the 7 context patches, flatten head
    past = x[..., :56]
    normed = (x - past.mean(-1, keepdim=True)) / torch.sqrt(past.var(-1, keepdim=True, unbiased=False) + 1e-5)
    assert torch.allclose(context_norm(x, 56), normed, atol=1e-6)
    tokens = method.backbone.encode_patches(normed[..., :56].unfold(-1, 8, 8))
    want = (method.head(tokens) - normed[..., 56:]).pow(2).mean()
    assert float(out.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)

    # the future steps change the loss, never what the encoder reads or the head predicts
    later = x.clone()
    later[..., 56:] += 5 * torch.randn(2, 3, 24)
    patches, _ = method.split(x)
    patches2, future2 = method.split(later)
    assert torch.equal(patches[:, :, :7], patches2[:, :, :7]) and not torch.equal(patches[:, :, 7:], patches2[:, :, 7:])
    assert float(method({"series": later}).loss.detach()) != pytest.approx(float(out.loss.detach()))
    assert method.teacher_pairs() == []  # value target: no EMA encoder
    # forecasting downstream reads the last 56 steps, as the pretext forecast from: earlier steps change nothing
    feats, mean, std = method.forecast_features(later)
    assert feats.shape == (2, 3, 7 * 16) and torch.allclose(mean, later[..., -56:].mean(-1, keepdim=True))
    earlier = later.clone()
    earlier[..., :24] = 0
    assert torch.equal(method.forecast_features(earlier)[0], feats)


def test_forecast_pretext_latent_target_and_errors(tmp_path):
    import torch.nn.functional as F

    from selfsup.core.build import build_method
    from selfsup.errors import ConfigError

    method = build_method(load_config(None, tiny_forecast(tmp_path, "method.target=latent")))
    x = torch.randn(2, 3, 80)
    out = method({"series": x})
    patches, _ = method.split(x)
    with torch.no_grad():
        z = method.backbone.encode_patches(patches[:, :, :7]).flatten(0, 1)
        h = method.target_backbone.encode_patches(patches).flatten(0, 1)[:, 7:]
        ctx, ahead = torch.arange(7).expand(6, 7), torch.arange(7, 10).expand(6, 3)
        want = (method.predictor(z, ctx, [ahead]) - F.layer_norm(h, (16,))).abs().mean()
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert method.teacher_pairs() == [(method.target_backbone, method.backbone)] and method.encoder is method.backbone

    build = lambda *o: build_method(load_config(None, tiny_forecast(tmp_path, *o)))  # noqa: E731
    with pytest.raises(ConfigError, match="must be a multiple of the 8-step patch"):
        build("method.horizon=20")
    with pytest.raises(ConfigError, match="leaving at least one"):
        build("method.horizon=80")
    with pytest.raises(ConfigError, match="patches that do not overlap"):
        build("backbone.patch_stride=4")
    assert build("method.horizon=null").horizon == 16  # a quarter of 10 patches, rounded down: 2 patches
    with pytest.raises(ConfigError, match="windows of 48 steps"):
        method({"series": torch.randn(2, 3, 48)})


def test_forecast_pretext_resumes_exactly(tmp_path):
    from tests.conftest import resume_matches_straight

    resume_matches_straight(load_config(None, tiny_forecast(tmp_path, "method.target=latent", "trainer.max_steps=6")),
                            tmp_path, until_step=3)


# --------------------------------------------------------------------------------------
# cross-variable prediction


def test_crossvar_hides_whole_channels_and_predicts_them_from_the_others(tmp_path):
    from selfsup.core.build import build_method
    from selfsup.errors import ConfigError
    from selfsup.methods.ts_crossvar import hidden_channels

    torch.manual_seed(0)
    visible, hidden = hidden_channels(500, 7, 0.25)
    assert visible.shape == (500, 5) and hidden.shape == (500, 2)  # round(0.25 x 7) = 2
    assert torch.equal(torch.cat([visible, hidden], 1).sort(1).values, torch.arange(7).expand(500, 7))
    counts = torch.bincount(hidden.flatten(), minlength=7).float()
    assert (counts / 1000 - 1 / 7).abs().max() < 0.04  # every channel held out as often
    assert hidden_channels(3, 2, 0.1)[1].shape == (3, 1)  # at least one
    with pytest.raises(ConfigError, match="leaves none"):
        hidden_channels(3, 2, 0.9)

    method = build_method(load_config(None, tiny_series(tmp_path, "method.name=ts_crossvar", "method.decoder_dim=16",
                                                        "method.decoder_heads=2", "backbone.dropout=0.0")))
    assert method.channels == 7  # ETTh1's, fixed from the data
    x = torch.randn(2, 7, 48)
    torch.manual_seed(4)
    out = method({"series": x})
    torch.manual_seed(4)
    visible, hidden = hidden_channels(2, 7, 0.25)
    patches = method.backbone.patchify(instance_norm(x)[0])
    rows = torch.arange(2)[:, None]
    tokens = method.backbone.encode_patches(patches[rows, visible])
    pred = method.decoder(tokens, visible, hidden)
    assert pred.shape == (2, 2, 6, 8)
    assert float(out.loss.detach()) == pytest.approx(float((pred - patches[rows, hidden]).pow(2).mean().detach()), rel=1e-5)
    # the encoder never reads a hidden channel: garbage there changes only the loss's targets
    spoiled = x.clone()
    spoiled[rows, hidden] = 1e3 * torch.randn(2, 2, 48)
    p2 = method.backbone.patchify(instance_norm(spoiled)[0])
    assert torch.allclose(method.backbone.encode_patches(p2[rows, visible]), tokens, atol=1e-5)

    with pytest.raises(ConfigError, match="needs series of at least 2 channels"):
        build_method(load_config(None, tiny_series(tmp_path, "method.name=ts_crossvar", "backbone.in_chans=1")))
    with pytest.raises(ConfigError, match="built for 7 channels"):
        method({"series": torch.randn(2, 3, 48)})


def test_crossvar_resumes_exactly(tmp_path):
    from tests.conftest import resume_matches_straight

    cfg = load_config(None, tiny_series(tmp_path, "method.name=ts_crossvar", "method.decoder_dim=16",
                                        "method.decoder_heads=2", "trainer.max_steps=6"))
    resume_matches_straight(cfg, tmp_path, until_step=3)


def test_forecast_fine_tuning_trains_a_copy_head_first_then_everything(tmp_path, capsys):
    """PatchTST's fine-tuning protocol from the CLI: the head alone, then the encoder with it; the best
    validation epoch is scored on the test months; the checkpoint's encoder is left as it was."""
    from selfsup.cli import main
    from selfsup.evaluate import load_method

    over = tiny_series(tmp_path, "trainer.max_steps=2", "trainer.run_name=f", "data.batch_size=256")
    assert main(["pretrain", *over]) == 0
    run = tmp_path / "runs" / "f"
    before = {k: v.clone() for k, v in load_method(run)[0].state_dict().items()}
    assert main(["eval", "forecast", "--checkpoint", str(run), "--finetune", "--horizons", "12", "--freeze-epochs", "1",
                 "--epochs", "1", "--device", "cpu"]) == 0
    result = json.loads((run / "eval_forecast_finetune.json").read_text())
    row = result["horizons"]["12"]
    assert result["protocol"] == "forecast-finetune" and row["phase"] in ("head", "all") and row["epoch"] == 1
    assert 0 < row["mse"] < 2 and 0 < row["mae"] < 2 and row["windows"]["test"] == ETT_TEST - 12 + 1
    assert "H=12 fine-tuned" in capsys.readouterr().out
    after = load_method(run)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    from selfsup.eval.forecast import finetune_forecast

    method, cfg, _ = load_method(run)
    head_only = finetune_forecast(method, cfg, device=torch.device("cpu"), horizon=12, freeze_epochs=1, epochs=0)
    both = finetune_forecast(method, cfg, device=torch.device("cpu"), horizon=12, freeze_epochs=1, epochs=1)
    assert head_only["phase"] == "head" and both["val_mse"] <= head_only["val_mse"]  # the head phase is shared
