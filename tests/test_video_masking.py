"""Video token masks: VideoMAE tubes, future slices, V-JEPA 3-D multi-block (against the official
generator's statistics)."""

import math

import pytest
import torch

from selfsup.errors import ConfigError
from selfsup.pretext.video_masking import (
    _block_size,
    future_masking_3d,
    multiblock3d_masking,
    tube_masking,
)

GRID = (8, 14, 14)  # 16 frames / tubelet 2, 224 px / patch 16
N = 8 * 14 * 14


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# VideoMAE tubes


def test_tube_ratio_exact_and_tubes_span_all_frames():
    b, (t, h, w) = 6, GRID
    ms = tube_masking(b, GRID, 0.9, generator=gen())
    per_slice = int(0.9 * h * w)  # VideoMAE: int(mask_ratio * num_patches_per_frame) = 176
    assert per_slice == 176
    assert ms.masked.shape == (b, t * per_slice) and ms.keep.shape == (b, N - t * per_slice)
    assert ms.mask.dtype == torch.bool and bool((ms.mask.sum(1) == t * per_slice).all())
    slices = ms.mask.view(b, t, h * w)
    assert bool((slices == slices[:, :1]).all())  # every hidden position is hidden in every slice
    assert bool((slices[:, 0].sum(1) == per_slice).all())
    assert not bool((slices[0, 0] == slices[1, 0]).all())  # samples differ
    assert bool(ms.mask.gather(1, ms.masked).all()) and not bool(ms.mask.gather(1, ms.keep).any())


def test_tube_ids_restore_inverts_the_shuffle():
    ms = tube_masking(4, (4, 6, 5), 0.75, generator=gen(3))
    shuffle = torch.cat([ms.keep, ms.masked], dim=1)
    assert bool((torch.sort(shuffle, dim=1).values == torch.arange(120)).all())  # a permutation
    restored = shuffle.gather(1, ms.ids_restore)
    assert bool((restored == torch.arange(120)).all())
    assert bool((ms.ids_restore.gather(1, shuffle) == torch.arange(120)).all())


def test_tube_counts_truncate_like_videomae():
    # 0.29 * 100 = 28.999999999999996 -> int() = 28 hidden per slice, as masking_generator.py counts
    ms = tube_masking(2, (3, 10, 10), 0.29, generator=gen())
    assert ms.masked.shape[1] == 3 * 28


def test_tube_seeded_reproducible():
    a = tube_masking(3, GRID, 0.9, generator=gen(7))
    b = tube_masking(3, GRID, 0.9, generator=gen(7))
    assert torch.equal(a.keep, b.keep) and torch.equal(a.ids_restore, b.ids_restore)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_tube_bad_ratio(ratio):
    with pytest.raises(ConfigError):
        tube_masking(2, GRID, ratio)


def test_tube_ratio_hiding_nothing():
    with pytest.raises(ConfigError):
        tube_masking(2, (2, 2, 2), 0.2)  # int(0.2 * 4) = 0


@pytest.mark.parametrize("grid", [(0, 14, 14), (8, 0, 14), (8, 14, 0), (8, 14)])
def test_bad_grids(grid):
    with pytest.raises(ConfigError):
        tube_masking(2, grid, 0.9)
    with pytest.raises(ConfigError):
        future_masking_3d(2, grid, 1)
    with pytest.raises(ConfigError):
        multiblock3d_masking(2, grid)


# ----------------------------------------------------------------------------------------------
# future slices


def test_future_masking_hides_exactly_the_last_slices():
    b, (t, h, w), k = 3, GRID, 3
    ms = future_masking_3d(b, GRID, k)
    slices = ms.mask.view(b, t, h * w)
    assert bool(slices[:, t - k:].all()) and not bool(slices[:, : t - k].any())
    assert bool((ms.keep == torch.arange((t - k) * h * w)).all())
    assert bool((ms.masked == torch.arange((t - k) * h * w, N)).all())
    assert bool((torch.cat([ms.keep, ms.masked], 1).gather(1, ms.ids_restore) == torch.arange(N)).all())


@pytest.mark.parametrize("k", [0, 8, -1])
def test_future_masking_bad_slices(k):
    with pytest.raises(ConfigError):
        future_masking_3d(2, GRID, k)


# ----------------------------------------------------------------------------------------------
# V-JEPA multi-block


def test_multiblock3d_context_target_disjoint_and_consistent():
    b = 16
    out = multiblock3d_masking(b, GRID, generator=gen(1))
    assert len(out) == 2
    for m in out:
        assert m.context.dtype == torch.long and m.target.dtype == torch.long
        assert m.context.shape[0] == b and m.target.shape[0] == b
        assert m.mask.shape == (b, N) and m.hidden.shape == (b, N)
        for idx in (m.context, m.target):
            assert bool((idx >= 0).all()) and bool((idx < N).all())
            assert bool((idx[:, 1:] > idx[:, :-1]).all())  # ascending, no repeats
        assert m.context.shape[1] + m.target.shape[1] <= N
        for row in range(b):
            c, tg = set(m.context[row].tolist()), set(m.target[row].tolist())
            assert not c & tg
        assert not bool(m.hidden.gather(1, m.context).any())  # context = complement of the blocks
        assert bool(m.hidden.gather(1, m.target).all())
        assert bool((m.mask.sum(1) == m.target.shape[1]).all()) and bool(m.mask.gather(1, m.target).all())
        # same-length truncation keeps the lowest indices, as the official cm[:min_keep]
        lowest = torch.sort(torch.where(~m.hidden, torch.arange(N), N + torch.arange(N)), 1).values
        assert torch.equal(m.context, lowest[:, : m.context.shape[1]])
        # the shortest row is not truncated
        assert m.context.shape[1] == int((~m.hidden).sum(1).min())
        assert m.target.shape[1] == int(m.hidden.sum(1).min())


def test_multiblock3d_blocks_span_all_frames():
    b, (t, h, w) = 8, GRID
    for m in multiblock3d_masking(b, GRID, temporal_scale=(1.0, 1.0), generator=gen(2)):
        slices = m.hidden.view(b, t, h * w)
        assert bool((slices == slices[:, :1]).all())


def test_multiblock3d_short_blocks_and_max_temporal_keep():
    b, (t, h, w) = 8, GRID
    out = multiblock3d_masking(b, GRID, temporal_scale=(0.25, 0.25), max_temporal_keep=0.5,
                               generator=gen(4))
    for m in out:
        slices = m.hidden.view(b, t, h * w)
        assert bool(slices[:, 4:].all())  # slices past max(1, int(8 * 0.5)) = 4 are never context
        assert bool((m.context < 4 * h * w).all())


def test_multiblock3d_max_keep_caps_context():
    out = multiblock3d_masking(8, GRID, max_keep=100, generator=gen(5))
    assert all(m.context.shape[1] <= 100 for m in out)


def test_multiblock3d_block_size_formula():
    # V-JEPA _sample_block_size on 8 x 14 x 14, u = (0, 0.5, 0.5): k = int(196 * 0.15) = 29,
    # a = 0.75 + 0.5 * 0.75 = 1.125, h = round(sqrt(32.625)) = 6, w = round(sqrt(25.78)) = 5
    assert _block_size((0.0, 0.5, 0.5), (1.0, 1.0), (0.15, 0.15), (0.75, 1.5), *GRID) == (8, 6, 5)
    # k = int(196 * 0.7) = 137, a = 1.5: h = round(sqrt(205.5)) = 14, w = round(sqrt(91.3)) = 10
    assert _block_size((0.0, 0.0, 1.0), (1.0, 1.0), (0.7, 0.7), (0.75, 1.5), *GRID) == (8, 14, 10)
    # temporal: max(1, int(8 * 0.3)) = 2
    assert _block_size((0.0, 0.0, 0.0), (0.3, 0.3), (0.15, 0.15), (1.0, 1.0), *GRID)[0] == 2


def test_multiblock3d_seeded_reproducible():
    a = multiblock3d_masking(4, GRID, generator=gen(9))
    b = multiblock3d_masking(4, GRID, generator=gen(9))
    assert all(torch.equal(x.context, y.context) and torch.equal(x.target, y.target) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs", [
    {"blocks": ((1, 1.0),), "aspect": (1.0, 1.0)},  # one block is the whole clip: blocks too large
    {"blocks": ((2, 0.95),), "aspect": (0.75, 1.5)},  # k = 186, a = 1: a 14 x 14 block
    {"blocks": ((8, 1.5),)},
    {"blocks": ((0, 0.15),)},
    {"blocks": ()},
    {"aspect": (0.0, 1.0)},
    {"temporal_scale": (0.0, 1.0)},
    {"max_temporal_keep": 0.0},
    {"max_keep": 0},
])
def test_multiblock3d_bad_parameters(kwargs):
    with pytest.raises(ConfigError):
        multiblock3d_masking(2, GRID, **kwargs)


# Statistics of the OFFICIAL generator, facebookresearch/jepa src/masks/multiblock3d.py (commit
# 51c59d518fc63c08464af6de585f78ac0c7ed4d5), MaskCollator(cfgs_mask=<the two masks of
# configs/pretrain/vitl16.yaml>, crop_size=224, num_frames=16, patch_size=16, tubelet_size=2) after
# torch.manual_seed(0), run once by hand on CPU: lengths of masks_enc[i] (context) and masks_pred[i]
# (target) over 20000 calls with batch size 1 (per-sample lengths, no truncation) and 2000 calls with
# batch size 8 (lengths after the same-length truncation). Values: (mean, std, standard error of the
# mean, standard error of the std = sqrt((m4 - s^4) / n) / (2 s)), n calls.
OFFICIAL = {
    # (batch, config, "context" | "target"): (mean, std, se_mean, se_std)
    (1, 0, "context"): (584.682, 120.406, 0.8514, 0.5879),
    (1, 0, "target"): (983.318, 120.406, 0.8514, 0.5879),
    (1, 1, "context"): (294.641, 113.635, 0.8035, 0.4577),
    (1, 1, "target"): (1273.359, 113.635, 0.8035, 0.4577),
    (8, 0, "context"): (422.216, 73.942, 1.6534, 1.1100),
    (8, 0, "target"): (811.460, 76.282, 1.7057, 1.2453),
    (8, 1, "context"): (140.048, 61.666, 1.3789, 0.9415),
    (8, 1, "target"): (1132.988, 61.327, 1.3713, 0.9314),
}
# 16 comparisons (8 means, 8 stds); a family-wise false-alarm rate of 1% for a correct generator
# gives a per-comparison two-sided z of 3.42 (Bonferroni): 3.5 standard errors of the difference.
Z = 3.5
DRAWS = {1: 1200, 8: 250}


def _moments(values: list[int]) -> tuple[float, float, float, float]:
    v = torch.tensor(values, dtype=torch.float64)
    n = v.numel()
    mean, std = float(v.mean()), float(v.std())
    m4 = float(((v - mean) ** 4).mean())
    return mean, std, std / math.sqrt(n), math.sqrt(max(m4 - std ** 4, 0.0) / n) / (2 * std)


@pytest.mark.parametrize("batch", [1, 8])
def test_multiblock3d_matches_official_statistics(batch):
    g = gen(2024)
    lengths = {(c, k): [] for c in (0, 1) for k in ("context", "target")}
    for _ in range(DRAWS[batch]):
        for c, m in enumerate(multiblock3d_masking(batch, GRID, generator=g)):
            lengths[(c, "context")].append(m.context.shape[1])
            lengths[(c, "target")].append(m.target.shape[1])
    for (c, kind), values in lengths.items():
        mean, std, se_mean, se_std = _moments(values)
        o_mean, o_std, o_se_mean, o_se_std = OFFICIAL[(batch, c, kind)]
        assert abs(mean - o_mean) <= Z * math.hypot(se_mean, o_se_mean), (batch, c, kind, mean, o_mean)
        assert abs(std - o_std) <= Z * math.hypot(se_std, o_se_std), (batch, c, kind, std, o_std)
        assert all(v % 8 == 0 for v in values)  # blocks span all 8 slices: whole tubes


def test_multiblock3d_redraws_samples_without_context():
    # 2 x 4 blocks on a 1 x 4 x 4 grid: two of them cover every row with probability 2/9;
    # such samples are redrawn (official ``while empty_context``), none is left without context
    out = multiblock3d_masking(64, (1, 4, 4), blocks=((2, 0.5),), aspect=(0.5, 0.5), generator=gen(6))
    m = out[0]
    assert bool((~m.hidden).any(1).all()) and m.context.shape[1] >= 1
