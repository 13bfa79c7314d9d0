"""Tests for the batched on-device augmentation (selfsup.pretext.augment).

They pin down the properties training relies on: per-sample independence,
reproducibility from a seeded generator, exact identity for unselected samples,
and agreement of every op with torchvision's per-image definition.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from selfsup.errors import ConfigError
from selfsup.pretext import augment as A
from selfsup.pretext.augment import Augment, AugmentConfig, eval_transform, simclr_view

ZERO_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (1.0, 1.0, 1.0)


def _images(batch: int = 4, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """Random uint8 RGB batch; random pixels make every op visibly change something."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=gen, dtype=torch.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _identity_config(size: int = 32, **overrides: object) -> AugmentConfig:
    """Every op off, full-image square crop, no normalization: the pipeline should be the identity."""
    base = dict(
        size=size,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        hflip_p=0.0,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
        mean=ZERO_MEAN,
        std=UNIT_STD,
    )
    base.update(overrides)
    return AugmentConfig(**base)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


# --------------------------------------------------------------------------- shapes, range, randomness


def test_output_shape_and_dtype_for_non_square_uint8_and_float_input() -> None:
    aug = Augment(simclr_view(24, strength=0.5))
    images = _images(3, 40, 56)
    out = aug(images, _gen(0))
    assert out.shape == (3, 3, 24, 24) and out.dtype == torch.float32
    torch.testing.assert_close(aug(_as_float(images), _gen(0)), out, atol=0, rtol=0)


def test_output_stays_in_unit_range_before_normalization() -> None:
    cfg = dataclasses.replace(
        simclr_view(32, strength=1.5), mean=ZERO_MEAN, std=UNIT_STD, solarize_p=0.5, jitter_p=1.0
    )
    out = Augment(cfg)(_images(32), _gen(1))
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_samples_get_independent_parameters() -> None:
    images = _images(1).expand(16, -1, -1, -1).contiguous()
    out = Augment(simclr_view(32))(images, _gen(2)).flatten(1)
    distances = torch.cdist(out, out)
    off_diagonal = distances[~torch.eye(16, dtype=torch.bool)]
    assert off_diagonal.min() > 0
    boxes = A.random_resized_crop_boxes(16, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), _gen(2))
    assert len({tuple(box.tolist()) for box in boxes}) > 1


def test_same_seed_reproduces_and_other_seed_differs() -> None:
    aug = Augment(dataclasses.replace(simclr_view(32), solarize_p=0.3))
    images = _images(8)
    first = aug(images, _gen(3))
    assert torch.equal(first, aug(images, _gen(3)))
    assert not torch.allclose(first, aug(images, _gen(4)))


def test_default_rng_is_used_without_generator() -> None:
    aug = Augment(simclr_view(32))
    torch.manual_seed(5)
    first = aug(_images(4))
    torch.manual_seed(5)
    assert torch.equal(first, aug(_images(4)))


def test_output_is_float32_under_bf16_autocast() -> None:
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = Augment(simclr_view(32))(_images(4), _gen(0))
    assert out.dtype == torch.float32


def test_is_a_well_behaved_submodule() -> None:
    # nn.Module.apply recurses into children: Augment must not shadow it.
    model = torch.nn.Sequential(Augment(simclr_view(32)))
    model.apply(lambda module: None)
    assert model.state_dict() == {}  # mean/std come from the config, not from checkpoints


def test_rejects_non_rgb_batches() -> None:
    aug = Augment(simclr_view(32))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        aug(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 or floating"):
        aug(torch.zeros(2, 3, 32, 32, dtype=torch.int32))


# --------------------------------------------------------------------------- geometry


def test_everything_off_reproduces_the_input() -> None:
    images = _images(4)
    out = Augment(_identity_config())(images, _gen(0))
    torch.testing.assert_close(out, _as_float(images), atol=1e-6, rtol=0)


def test_flip_probability_one_flips_exactly() -> None:
    images = _images(4)
    out = Augment(_identity_config(hflip_p=1.0))(images, _gen(0))
    torch.testing.assert_close(out, _as_float(images).flip(-1), atol=1e-6, rtol=0)


def test_flip_rate_matches_probability() -> None:
    images = _images(1, 8, 8).expand(4000, -1, -1, -1).contiguous()
    out = Augment(_identity_config(size=8, hflip_p=0.3))(images, _gen(6))
    flipped = (out - _as_float(images).flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert abs(flipped.float().mean().item() - 0.3) < 0.03


def test_crop_boxes_respect_image_scale_and_ratio() -> None:
    boxes = A.random_resized_crop_boxes(2000, 60, 80, (0.2, 0.6), (0.5, 2.0), _gen(7))
    top, left, height, width = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 60).all() and (left + width <= 80).all()
    area = height * width / (60 * 80)
    assert area.min() > 0.18 and area.max() < 0.63  # slack for rounding the sides to pixels
    assert (width / height).min() > 0.45 and (width / height).max() < 2.2
    assert top.unique().numel() > 10 and left.unique().numel() > 10


def test_crop_falls_back_to_center_when_no_candidate_fits() -> None:
    # A box of the full area with aspect >= 2 can never fit a square image.
    boxes = A.random_resized_crop_boxes(5, 40, 40, (1.0, 1.0), (2.0, 3.0), _gen(8))
    expected = torch.tensor([10.0, 0.0, 20.0, 40.0]).expand(5, 4)
    assert torch.equal(boxes, expected)


def test_crop_flip_matches_torchvision_resized_crop() -> None:
    # Crops at least as large as the output never sample outside the box, where
    # torchvision's crop-then-resize clamps to the box edge and grid_sample does not.
    images = _as_float(_images(12, 64, 64))
    boxes = A.random_resized_crop_boxes(12, 64, 64, (0.3, 1.0), (3 / 4, 4 / 3), _gen(9))
    boxes[:, 2:] = boxes[:, 2:].clamp(min=32)
    flip = torch.arange(12) % 2 == 0
    expected = []
    for img, (top, left, height, width), mirror in zip(images, boxes.int().tolist(), flip):
        crop = TF.resized_crop(img, top, left, height, width, [32, 32], antialias=False)
        expected.append(crop.flip(-1) if mirror else crop)
    torch.testing.assert_close(A.crop_flip(images, boxes, flip, 32), torch.stack(expected), atol=1e-5, rtol=0)


def test_cpu_sample_groups_do_not_change_the_result() -> None:
    aug = Augment(dataclasses.replace(simclr_view(32), solarize_p=0.3))
    images = _images(10)
    params = aug.sample_params(10, 32, 32, _gen(14))
    whole = aug.apply_params(images, params)
    aug.cpu_chunk_elements = 3 * 32 * 32 * 3  # groups of 3 samples, last group of 1
    torch.testing.assert_close(aug.apply_params(images, params), whole, atol=0, rtol=0)


# --------------------------------------------------------------------------- color


def test_grayscale_probability_one_gives_equal_channels() -> None:
    out = Augment(_identity_config(grayscale_p=1.0))(_images(4), _gen(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_grayscale_rate_matches_probability() -> None:
    out = Augment(_identity_config(size=8, grayscale_p=0.2))(_images(4000, 8, 8), _gen(10))
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(dim=1) & (out[:, 1] == out[:, 2]).flatten(1).all(dim=1)
    assert abs(gray.float().mean().item() - 0.2) < 0.03


def test_zero_strength_jitter_is_identity() -> None:
    images = _images(8)
    cfg = _identity_config(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    torch.testing.assert_close(Augment(cfg)(images, _gen(0)), _as_float(images), atol=1e-6, rtol=0)
    x = _as_float(images)
    assert torch.equal(A.adjust_brightness(x, torch.ones(8)), x)


def test_hue_shift_by_zero_is_identity_and_hsv_round_trips() -> None:
    x = _as_float(_images(8))
    torch.testing.assert_close(A.adjust_hue(x, torch.zeros(8)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(A.hsv_to_rgb(A.rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    hsv = A.rgb_to_hsv(x)
    assert hsv.min() >= 0 and hsv[:, 0].max() < 1 and hsv[:, 1:].max() <= 1


@pytest.mark.parametrize(
    ("ours", "theirs", "low", "high"),
    [
        (A.adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
        (A.adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
        (A.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
        (A.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_color_ops_match_torchvision_per_sample(ours, theirs, low: float, high: float) -> None:
    x = _as_float(_images(6, 16, 16))
    factors = torch.linspace(low, high, 6)
    expected = torch.stack([theirs(img, float(f)) for img, f in zip(x, factors)])
    # 1e-3: torchvision's luma uses 0.2989 where we use the exact 601-2 weight 0.299.
    torch.testing.assert_close(ours(x, factors), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("ops", [(0, 1, 2, 3), (0, 2), (3,), (1, 3), (0, 1, 2)])
def test_jitter_applies_each_samples_own_order(ops: tuple[int, ...]) -> None:
    batch = 8
    x = _as_float(_images(batch, 16, 16))
    gen = _gen(15)
    order = torch.tensor(ops)[torch.stack([torch.randperm(len(ops), generator=gen) for _ in range(batch)])]
    factors = torch.rand(batch, 4, generator=gen) * torch.tensor([2.0, 2.0, 2.0, 1.0]) - torch.tensor([0, 0, 0, 0.5])
    selected = torch.ones(batch, dtype=torch.bool)
    params = A.JitterParams(selected=selected, factors=factors, order=order, ops=ops)
    functions = [A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue]
    expected = []
    for img, sample_order, sample_factors in zip(x, order.tolist(), factors):
        img = img.unsqueeze(0)
        for op in sample_order:
            img = functions[op](img, sample_factors[op : op + 1])
        expected.append(img)
    torch.testing.assert_close(A.apply_color_jitter(x, params), torch.cat(expected), atol=1e-6, rtol=0)


def test_unselected_samples_are_bit_identical() -> None:
    x = _as_float(_images(64, 8, 8))
    params = A.sample_color_jitter(64, 0.8, 0.8, 0.8, 0.2, 0.5, _gen(11))
    out = A.apply_color_jitter(x, params)
    keep = ~params.selected
    assert 0 < keep.sum() < 64
    assert torch.equal(out[keep], x[keep])
    assert not torch.equal(out[~keep], x[~keep])


@pytest.mark.parametrize("name", ["blur", "hue"])
def test_subset_and_masked_paths_agree(name: str) -> None:
    # CPU runs expensive ops on the selected rows only; CUDA masks a full-batch result.
    x = _as_float(_images(12, 16, 16))
    selected = torch.arange(12) % 3 == 0
    per_sample = torch.linspace(0.2, 1.8, 12) if name == "blur" else torch.linspace(-0.4, 0.4, 12)

    def op(rows_x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if name == "blur":
            return A.gaussian_blur(rows_x, per_sample[rows], 5)
        return A.adjust_hue(rows_x, per_sample[rows])

    subset = A._apply_to_selected(x, selected, op, subset=True)
    masked = A._apply_to_selected(x, selected, op, subset=False)
    torch.testing.assert_close(subset, masked, atol=0, rtol=0)
    assert torch.equal(subset[~selected], x[~selected]) and not torch.equal(subset[selected], x[selected])


def test_jitter_order_is_random_per_sample() -> None:
    params = A.sample_color_jitter(200, 0.4, 0.4, 0.4, 0.1, 1.0, _gen(12))
    assert len({tuple(row) for row in params.order.tolist()}) > 12
    assert (params.order.sort(dim=1).values == torch.arange(4)).all()


# --------------------------------------------------------------------------- blur, solarize


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().sum() + (x[..., :, 1:] - x[..., :, :-1]).abs().sum()


def test_blur_reduces_total_variation_and_spares_unselected() -> None:
    images = _images(32)
    cfg = _identity_config(blur_p=0.5, blur_kernel_frac=0.2)
    out = Augment(cfg)(images, _gen(13))
    x = _as_float(images)
    unchanged = (out == x).flatten(1).all(dim=1)
    assert 0 < unchanged.sum() < 32
    for blurred, original in zip(out[~unchanged], x[~unchanged]):
        assert _total_variation(blurred) < _total_variation(original)


def test_blur_matches_torchvision_per_sample() -> None:
    x = _as_float(_images(3, 20, 24))
    sigma = torch.tensor([0.3, 1.0, 2.0])
    expected = torch.stack([TF.gaussian_blur(img, [7, 7], [float(s), float(s)]) for img, s in zip(x, sigma)])
    torch.testing.assert_close(A.gaussian_blur(x, sigma, 7), expected, atol=1e-5, rtol=0)


def test_blur_kernel_is_odd_and_ten_percent_of_the_side() -> None:
    assert simclr_view(224).blur_kernel_size == 23
    assert simclr_view(32).blur_kernel_size == 3


def test_solarize_with_threshold_zero_inverts() -> None:
    images = _images(4)
    out = Augment(_identity_config(solarize_p=1.0, solarize_threshold=0.0))(images, _gen(0))
    torch.testing.assert_close(out, 1 - _as_float(images), atol=1e-6, rtol=0)


def test_normalization_uses_config_mean_and_std() -> None:
    images = _images(2)
    cfg = _identity_config(mean=A.CIFAR10_MEAN, std=A.CIFAR10_STD)
    mean = torch.tensor(A.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(A.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(Augment(cfg)(images), (_as_float(images) - mean) / std, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- config


def test_simclr_view_follows_the_paper() -> None:
    cfg = simclr_view(224)
    assert (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == pytest.approx((0.8, 0.8, 0.8, 0.2))
    assert (cfg.jitter_p, cfg.grayscale_p, cfg.hflip_p, cfg.blur_p) == (0.8, 0.2, 0.5, 0.5)
    assert cfg.crop_scale == (0.08, 1.0) and cfg.blur_sigma == (0.1, 2.0)
    cifar = simclr_view(32, strength=0.5, blur=False, mean=A.CIFAR10_MEAN, std=A.CIFAR10_STD)
    assert cifar.brightness == pytest.approx(0.4) and cifar.hue == pytest.approx(0.1)
    assert cifar.blur_p == 0.0 and cifar.mean == A.CIFAR10_MEAN


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", 0),
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.8, 0.5)),
        ("crop_scale", (0.5, 1.2)),
        ("crop_ratio", (2.0, 1.0)),
        ("hflip_p", 1.5),
        ("jitter_p", -0.1),
        ("grayscale_p", float("nan")),
        ("blur_p", 2.0),
        ("solarize_p", -1.0),
        ("brightness", -0.1),
        ("contrast", -1.0),
        ("saturation", -0.5),
        ("hue", 0.6),
        ("blur_sigma", (0.0, 1.0)),
        ("blur_kernel_frac", 0.0),
        ("std", (0.2, 0.0, 0.2)),
        ("mean", (0.5, 0.5)),
    ],
)
def test_validate_names_the_bad_field(field: str, value: object) -> None:
    cfg = dataclasses.replace(AugmentConfig(), **{field: value})
    with pytest.raises(ConfigError, match=field):
        cfg.validate()
    with pytest.raises(ConfigError):
        Augment(cfg)


def test_default_config_is_valid() -> None:
    AugmentConfig().validate()
    with pytest.raises(ConfigError):
        simclr_view(224, strength=3.0)  # hue 0.6 > 0.5


# --------------------------------------------------------------------------- eval


def test_eval_transform_only_normalizes_at_target_size() -> None:
    images = _images(2)
    out = eval_transform(images, 32, ZERO_MEAN, UNIT_STD)
    torch.testing.assert_close(out, _as_float(images), atol=0, rtol=0)


@pytest.mark.parametrize(("height", "width", "size"), [(300, 400, 224), (224, 224, 64), (36, 40, 32), (28, 28, 32)])
def test_eval_transform_shapes(height: int, width: int, size: int) -> None:
    out = eval_transform(_images(2, height, width), size, A.IMAGENET_MEAN, A.IMAGENET_STD)
    assert out.shape == (2, 3, size, size) and out.dtype == torch.float32


def test_eval_transform_center_crops_small_images_without_upscaling() -> None:
    images = _images(2, 32, 40)
    out = eval_transform(images, 32, ZERO_MEAN, UNIT_STD)
    torch.testing.assert_close(out, _as_float(images)[..., 4:36], atol=0, rtol=0)
