"""Tests for selfsup.eval: kNN, linear probe, logistic regression, few-shot, diagnostics, feature cache."""

from __future__ import annotations

import math

import pytest
import torch
from threadpoolctl import threadpool_limits

from selfsup.eval import (
    FeatureCache,
    alignment,
    class_separation,
    diagnose,
    extract_features,
    few_shot,
    format_table,
    knn_classify,
    linear_probe,
    logistic_regression,
    make_key,
    mean_pair_cosine,
    per_dim_std,
    rankme,
    svm_probe,
    uniformity,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These problems are tiny: one thread is fastest and immune to a busy shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)


def gaussian_clusters(
    n: int, num_classes: int = 10, dim: int = 32, spread: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples around ``num_classes`` random unit-scale centres; small spread = well separated."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(n) % num_classes
    feats = centres[labels] + spread * torch.randn(n, dim, generator=generator)
    return feats, labels


# ----------------------------------------------------------------------------- kNN


def test_knn_separable_clusters_perfect() -> None:
    train_x, train_y = gaussian_clusters(1000, seed=0)
    test_x, test_y = gaussian_clusters(200, seed=1)
    result = knn_classify(train_x, train_y, test_x, test_y, ks=(20, 200))
    assert set(result) == {"k20", "k200"}
    for entry in result.values():
        assert entry["top1"] == pytest.approx(100.0)
        assert entry["top5"] == pytest.approx(100.0)


def _unit(angle: float, norm: float = 1.0) -> list[float]:
    return [norm * math.cos(angle), norm * math.sin(angle)]


def test_knn_matches_hand_computed_votes() -> None:
    # Bank on the unit circle (norms vary: kNN must normalize): class 0 at angle 0,
    # class 1 at angles +-0.5, class 2 far away at angles 2.9, 3.0, 3.1.
    bank = torch.tensor([_unit(0.0, 3.0), _unit(0.5), _unit(-0.5, 2.0), _unit(2.9), _unit(3.0, 0.5), _unit(3.1)])
    bank_labels = torch.tensor([0, 1, 1, 2, 2, 2])
    queries = torch.tensor([_unit(0.0, 7.0), _unit(0.25)])

    # Query 0 (angle 0), k=3 -> neighbours: angle 0 (cos 1, class 0), +-0.5 (cos 0.5 each, class 1).
    # T=0.07: class 0 gets exp(1/0.07) = 1.6e6, class 1 gets 2*exp(cos(0.5)/0.07) = 5.6e5 -> class 0
    # (a plain majority vote would say class 1). T=1: exp(1) = 2.72 < 2*exp(0.878) = 4.81 -> class 1.
    c0, c1 = math.exp(1 / 0.07), 2 * math.exp(math.cos(0.5) / 0.07)
    assert c0 > c1
    c0, c1 = math.exp(1.0), 2 * math.exp(math.cos(0.5))
    assert c1 > c0
    # Query 1 (angle 0.25): neighbours angle 0 (cos 0.25, class 0), 0.5 (cos 0.25, class 1),
    # -0.5 (cos 0.75, class 1) -> class 1 has the same vote as class 0 plus more, at any T.
    c0 = math.exp(math.cos(0.25) / 0.07)
    c1 = math.exp(math.cos(0.25) / 0.07) + math.exp(math.cos(0.75) / 0.07)
    assert c1 > c0

    expected = {0.07: [0, 1], 1.0: [1, 1]}
    for temperature, predictions in expected.items():
        for target in range(3):
            labels = torch.full((2,), target)
            result = knn_classify(bank, bank_labels, queries, labels, ks=(3,), temperature=temperature)
            hits = sum(p == target for p in predictions)
            assert result["k3"]["top1"] == pytest.approx(50.0 * hits), (temperature, target)
            assert "top5" not in result["k3"]  # only 3 classes
    # k=6: the whole bank votes; class 2 (cos < 0) adds almost nothing, the answers stay 0 and 1.
    result = knn_classify(bank, bank_labels, queries, torch.tensor([0, 1]), ks=(6,))
    assert result["k6"]["top1"] == pytest.approx(100.0)


def test_knn_hand_votes_with_distinct_winners() -> None:
    # 1-D-like bank on a circle where the two queries are won by different classes.
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [-0.9, 0.2], [0.0, -1.0]])
    bank_labels = torch.tensor([0, 0, 1, 2, 2, 1])
    queries = torch.tensor([[1.0, 0.1], [-1.0, 0.1]])
    normed_bank = torch.nn.functional.normalize(bank, dim=1)
    normed_q = torch.nn.functional.normalize(queries, dim=1)
    sims = normed_q @ normed_bank.T
    predictions = []
    for row in sims:
        top = row.argsort(descending=True)[:3]
        votes = torch.zeros(3)
        for i in top:
            votes[bank_labels[i]] += torch.exp(row[i] / 0.07)
        predictions.append(int(votes.argmax()))
    assert predictions == [0, 2]
    result = knn_classify(bank, bank_labels, queries, torch.tensor([0, 2]), ks=(3,))
    assert result["k3"]["top1"] == pytest.approx(100.0)
    result = knn_classify(bank, bank_labels, queries, torch.tensor([0, 0]), ks=(3,))
    assert result["k3"]["top1"] == pytest.approx(50.0)


def test_knn_leave_one_out_hand_computed() -> None:
    # Two tight pairs whose members carry different labels: each point's nearest *other* point has
    # the other label, so leave-one-out k=1 gets every query wrong, while scoring the bank against
    # itself finds each query's own feature first and gets every one right.
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [-0.9, -0.1]])
    labels = torch.tensor([0, 1, 1, 0])
    assert knn_classify(bank, labels, bank, labels, ks=(1,))["k1"]["top1"] == pytest.approx(100.0)
    assert knn_classify(bank, labels, bank, labels, ks=(1,), leave_one_out=True)["k1"]["top1"] == 0.0
    # k=3 out of the 3 others: query 0 sees 1 (cos .994, label 1), 3 (cos -.994, 0), 2 (cos -1, 1);
    # label 1 gets exp(.994/T) + exp(-1/T) > exp(-.994/T): wrong again. k is clamped to N - 1 = 3.
    result = knn_classify(bank, labels, bank, labels, ks=(3, 4), leave_one_out=True)
    assert set(result) == {"k3"} and result["k3"]["top1"] == 0.0
    # chunks of one query: the left-out entry must follow the chunk's offset
    x, y = gaussian_clusters(50, spread=3.0, seed=6)
    whole = knn_classify(x, y, x, y, ks=(5,), leave_one_out=True)
    assert knn_classify(x, y, x, y, ks=(5,), leave_one_out=True, chunk_size=1) == whole
    assert whole["k5"]["top1"] < knn_classify(x, y, x, y, ks=(5,))["k5"]["top1"]
    with pytest.raises(ValueError, match="leave_one_out"):
        knn_classify(x, y, x[:10], y[:10], leave_one_out=True)


def test_knn_chunked_equals_unchunked() -> None:
    train_x, train_y = gaussian_clusters(600, spread=1.5, seed=2)
    test_x, test_y = gaussian_clusters(137, spread=1.5, seed=3)
    whole = knn_classify(train_x, train_y, test_x, test_y, ks=(1, 5, 20), chunk_size=10_000)
    chunked = knn_classify(train_x, train_y, test_x, test_y, ks=(1, 5, 20), chunk_size=16)
    assert whole == chunked
    assert whole["k20"]["top1"] < 100.0  # noisy enough to be a real comparison


def test_knn_clamps_k_and_rejects_unlabeled_bank(caplog) -> None:
    train_x, train_y = gaussian_clusters(30, num_classes=3, seed=4)
    test_x, test_y = gaussian_clusters(9, num_classes=3, seed=5)
    with caplog.at_level("WARNING", logger="selfsup.eval.knn"):
        result = knn_classify(train_x, train_y, test_x, test_y, ks=(20, 200))
    assert set(result) == {"k20", "k30"}
    assert [r.getMessage() for r in caplog.records] == [
        "k=200 is larger than the feature bank (30 samples); using k=30"]
    bad_labels = train_y.clone()
    bad_labels[3] = -1
    with pytest.raises(ValueError, match="unlabeled"):
        knn_classify(train_x, bad_labels, test_x, test_y)


# ----------------------------------------------------------------------------- linear


def test_linear_probe_separable_reaches_100() -> None:
    train_x, train_y = gaussian_clusters(400, seed=6)
    test_x, test_y = gaussian_clusters(100, seed=7)
    result = linear_probe(train_x, train_y, test_x, test_y, epochs=15, batch_size=64, progress=False)
    assert result["last_top1"] >= 99.0
    assert result["best_top1"] >= result["last_top1"]
    assert len(result["curve"]) == 15 and len(result["train_loss"]) == 15
    assert result["train_loss"][-1] < result["train_loss"][0]
    # the best epoch is the first of the curve's maxima (1-based), and its score the best
    assert result["best_epoch"] == result["curve"].index(max(result["curve"])) + 1
    assert result["best_top1"] == max(result["curve"])
    assert result["last_top5"] == pytest.approx(100.0)


@pytest.mark.parametrize(("normalize", "optimizer"), [("l2", "sgd"), ("none", "adamw")])
def test_linear_probe_other_settings_converge(normalize: str, optimizer: str) -> None:
    train_x, train_y = gaussian_clusters(300, num_classes=4, seed=8)
    test_x, test_y = gaussian_clusters(80, num_classes=4, seed=9)
    result = linear_probe(
        train_x, train_y, test_x, test_y, epochs=10, batch_size=32, normalize=normalize, optimizer=optimizer,
        progress=False,
    )
    assert result["last_top1"] >= 99.0
    assert result["last_top5"] is None  # fewer than 5 classes


def test_linear_probe_is_deterministic() -> None:
    train_x, train_y = gaussian_clusters(200, spread=1.5, seed=10)
    test_x, test_y = gaussian_clusters(50, spread=1.5, seed=11)
    first = linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=33, seed=5, progress=False)
    second = linear_probe(train_x, train_y, test_x, test_y, epochs=3, batch_size=33, seed=5, progress=False)
    assert first["curve"] == second["curve"] and first["train_loss"] == second["train_loss"]


def test_logistic_regression_separable() -> None:
    train_x, train_y = gaussian_clusters(300, seed=12)
    test_x, test_y = gaussian_clusters(100, seed=13)
    result = logistic_regression(train_x, train_y, test_x, test_y)
    assert result["top1"] == pytest.approx(100.0)
    assert result["top5"] == pytest.approx(100.0)
    assert result["converged"] is True


def _rings(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two concentric rings (radius 1 and 3, a little noise): no line separates them, a kernel does."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    angle = torch.rand(n, generator=g) * 2 * math.pi
    radius = 1.0 + 2.0 * y + 0.1 * torch.randn(n, generator=g)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], 1), y


def test_svm_probe_is_ts2vecs_protocol() -> None:
    train_x, train_y = _rings(200, seed=1)
    test_x, test_y = _rings(100, seed=2)
    linear = logistic_regression(train_x, train_y, test_x, test_y)["top1"]
    svm = svm_probe(train_x, train_y, test_x, test_y)
    assert linear < 75 and svm["top1"] == pytest.approx(100.0)  # the RBF kernel separates the rings
    assert svm["searched"] and svm["C"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, float("inf"))
    assert svm_probe(train_x, train_y, test_x, test_y) == svm  # unshuffled folds, one job: deterministic
    # under 50 training samples (or 5 per class) no search: a hard margin, C = inf, as the official fit_svm
    small = svm_probe(train_x[:40], train_y[:40], test_x, test_y)
    assert not small["searched"] and small["C"] == float("inf") and small["top1"] > 90
    with pytest.raises(ValueError, match="at least 2 classes"):
        svm_probe(train_x, torch.zeros_like(train_y), test_x, test_y)


def test_logistic_regression_that_stops_early_says_so_once(caplog) -> None:
    import warnings

    # overlapping clusters: one iteration (44 %) and convergence (50 %) score differently
    train_x, train_y = gaussian_clusters(300, spread=3.0, seed=12)
    test_x, test_y = gaussian_clusters(100, spread=3.0, seed=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's ConvergenceWarning must not escape
        result = logistic_regression(train_x, train_y, test_x, test_y, max_iter=1)
    assert result["converged"] is False
    # the scores are the last iterate's: scikit-learn's own model after its single L-BFGS iteration
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x.double().numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(max_iter=1).fit(scaler.transform(train_x.double().numpy()), train_y.numpy())
    hits = (model.predict(scaler.transform(test_x.double().numpy())) == test_y.numpy()).sum()
    assert result["top1"] == pytest.approx(100.0 * hits / 100)
    assert [r for r in caplog.records if "max_iter=1 before converging" in r.getMessage()]


# ----------------------------------------------------------------------------- few-shot


def test_few_shot_separable_near_perfect() -> None:
    feats, labels = gaussian_clusters(400, num_classes=8, seed=14)
    result = few_shot(feats, labels, n_way=5, k_shot=(1, 5), n_query=10, episodes=20)
    assert set(result) == {"1shot", "5shot"}
    assert result["5shot"]["mean"] >= 99.0
    assert result["1shot"]["mean"] >= 95.0


def test_few_shot_ci_shrinks_with_more_episodes() -> None:
    feats, labels = gaussian_clusters(400, num_classes=8, spread=1.5, seed=15)
    few = few_shot(feats, labels, n_way=5, k_shot=(1,), n_query=5, episodes=20, seed=1)
    many = few_shot(feats, labels, n_way=5, k_shot=(1,), n_query=5, episodes=200, seed=1)
    assert 20.0 < many["1shot"]["mean"] < 100.0  # noisy: not trivially perfect
    assert many["1shot"]["ci95"] < few["1shot"]["ci95"]


def test_few_shot_rejects_too_few_classes() -> None:
    feats, labels = gaussian_clusters(40, num_classes=4, seed=16)
    with pytest.raises(ValueError, match="only 4 classes qualify"):
        few_shot(feats, labels, n_way=5, k_shot=(1,), n_query=2, episodes=2)


# ----------------------------------------------------------------------------- diagnostics


def test_rankme_full_rank_and_rank_one() -> None:
    orthogonal, _ = torch.linalg.qr(torch.randn(256, 64, generator=torch.Generator().manual_seed(0)))
    assert rankme(orthogonal) == pytest.approx(64, rel=0.02)
    rank_one = torch.randn(256, 1) @ torch.randn(1, 64)
    assert rankme(rank_one) == pytest.approx(1.0, abs=0.05)


def test_alignment_and_uniformity() -> None:
    z = torch.randn(100, 16, generator=torch.Generator().manual_seed(1))
    assert alignment(z, z.clone()) == pytest.approx(0.0, abs=1e-6)
    assert alignment(z, -z) == pytest.approx(4.0, rel=1e-5)
    spread = torch.randn(500, 16, generator=torch.Generator().manual_seed(2))
    clustered = torch.ones(500, 16) + 0.05 * torch.randn(500, 16, generator=torch.Generator().manual_seed(3))
    assert uniformity(spread) < uniformity(clustered)
    # by hand: three unit vectors at 0, 90 and 180 degrees; squared distances 2, 2, 4
    three = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])
    assert uniformity(three) == pytest.approx(math.log((2 * math.exp(-4) + math.exp(-8)) / 3), rel=1e-6)


def test_per_dim_std_and_pair_cosine() -> None:
    iso = torch.randn(4000, 64, generator=torch.Generator().manual_seed(4))
    assert per_dim_std(iso) == pytest.approx(1 / math.sqrt(64), rel=0.05)
    assert abs(mean_pair_cosine(iso)) < 0.02
    constant = torch.ones(100, 64)
    assert per_dim_std(constant) == pytest.approx(0.0, abs=1e-6)
    assert mean_pair_cosine(constant) == pytest.approx(1.0, abs=1e-5)


def test_class_separation_orders_clusters() -> None:
    tight_x, tight_y = gaussian_clusters(300, spread=0.1, seed=5)
    loose_x, loose_y = gaussian_clusters(300, spread=2.0, seed=5)
    assert class_separation(tight_x, tight_y) > class_separation(loose_x, loose_y)


def test_diagnose_verdicts() -> None:
    generator = torch.Generator().manual_seed(6)
    constant = torch.ones(500, 128) + 1e-4 * torch.randn(500, 128, generator=generator)
    assert diagnose(constant)["verdict"].startswith("collapsed")
    rank3 = torch.randn(500, 3, generator=generator) @ torch.randn(3, 128, generator=generator)
    verdict = diagnose(rank3)["verdict"]
    assert verdict.startswith("dimensional collapse"), verdict
    iso = torch.randn(500, 128, generator=generator)
    labels = torch.arange(500) % 5
    report = diagnose(iso, labels=labels, z_pairs=(iso, iso + 0.01 * torch.randn(500, 128, generator=generator)))
    assert report["verdict"].startswith("healthy"), report["verdict"]
    assert {"rankme", "per_dim_std", "mean_pair_cosine", "uniformity", "class_separation", "alignment"} <= set(report)


def test_format_table_grid_and_flat() -> None:
    grid = format_table({"k20": {"top1": 91.234, "top5": 99.0}, "k200": {"top1": 90.0, "top5": 98.5}})
    lines = grid.splitlines()
    assert "top1" in lines[0] and "top5" in lines[0]
    assert lines[2].startswith("k20") and "91.23" in lines[2]
    flat = format_table({"rankme": 12.3456, "verdict": "healthy (rank 12.3 of 64)", "curve": [1.0] * 10})
    assert "12.35" in flat and "healthy" in flat and "10 values" in flat


# ----------------------------------------------------------------------------- features & cache


def test_extract_features_concatenates_batches() -> None:
    weight = torch.randn(4, 3)
    batches = [
        {"x": torch.randn(5, 4), "labels": torch.arange(5)},
        {"x": torch.randn(2, 4), "labels": torch.tensor([7, 8])},
    ]
    feats, labels = extract_features(lambda batch: batch["x"] @ weight, batches, device="cpu")
    assert feats.shape == (7, 3) and feats.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3, 4, 7, 8]
    assert torch.allclose(feats[:5], batches[0]["x"] @ weight)
    assert not feats.is_inference()  # usable by a trainable probe and in-place ops


def test_feature_cache_round_trip_and_corrupt_miss(tmp_path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    key = make_key("ckpt.pt", 1234, 5.0, "cifar10", "train")
    assert len(key) == 16 and key == make_key("ckpt.pt", 1234, 5.0, "cifar10", "train")
    assert key != make_key("ckpt.pt", 1234, 5.0, "cifar10", "test")
    assert cache.get(key) is None
    feats, labels = torch.randn(10, 4), torch.arange(10)
    cache.put(key, feats, labels)
    cached = cache.get(key)
    assert cached is not None
    assert torch.equal(cached[0], feats) and torch.equal(cached[1], labels)
    assert not list((tmp_path / "cache").glob("*.tmp"))
    cache.path(key).write_bytes(b"not a torch file")
    assert cache.get(key) is None
