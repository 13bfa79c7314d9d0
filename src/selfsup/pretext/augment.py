"""Batched image augmentation that runs on the training device inside the training step.

Why this exists: per-image torchvision transforms in data-loader workers are the
usual bottleneck of contrastive pretraining (two heavy views per image, small
images, few CPU cores). Here the loader only decodes to a uint8 batch
(B, 3, H, W); every random operation is then applied to the whole batch at once,
on CPU or CUDA, with independent random parameters per sample, using masks
(`torch.where`) instead of Python loops over samples and, on CUDA, never
reading random values back to the host (no syncs). All randomness comes from
one `torch.Generator`, so a seeded generator reproduces a batch exactly.

Pipeline of :class:`Augment` (SimCLR order):

1. random resized crop + horizontal flip as ONE bilinear `grid_sample`
   (the flip is folded into the sampling grid);
2. color jitter (brightness, contrast, saturation, hue) with factors AND a
   random op order drawn independently per sample, like torchvision per image;
3. random grayscale;
4. gaussian blur with a per-sample sigma (grouped separable convolution);
5. solarize;
6. normalize with mean/std.

All parameters are drawn for the whole batch first (:meth:`Augment.sample_params`),
then applied (:meth:`Augment.apply_params`). On CPU the application runs over groups
of samples sized to stay in cache, which is several times faster than
full-batch temporaries of tens of MB (each one page-faulted afresh), and the
expensive optional ops (blur, hue) run only on the samples selected for them;
results do not depend on either.

Semantics follow torchvision's tensor transforms (blend formulas, clamping
after every color op, RandomResizedCrop box sampling, GaussianBlur kernel),
with documented differences: grayscale/contrast/saturation use the exact
ITU-R 601-2 luma weights (0.299, not torchvision's 0.2989), and crops are
resampled without antialiasing (like kornia; torchvision v2 antialiases by
default), which only matters for crops shrunk by a large factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import ConfigError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights used for grayscale, contrast and saturation."""

CROP_TRIES = 10
"""Candidate boxes per sample before falling back to a center crop (as torchvision)."""

EVAL_CROP_FRACTION = 0.875
"""Standard ImageNet eval ratio: resize to 256, center crop 224."""

EVAL_RESIZE_MIN_SIZE = 64
"""Below this output side (CIFAR-like data) eval does not upscale before cropping."""

# Indices of the color-jitter operations in the per-sample factor table.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3
_IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)


@dataclass
class AugmentConfig:
    """Parameters of one augmented view; defaults are a SimCLR-like CIFAR view without blur.

    Probabilities are per sample. Strengths follow torchvision's ColorJitter:
    a factor is drawn uniformly in [max(0, 1 - s), 1 + s] (hue: in [-hue, hue]).
    """

    size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def validate(self) -> None:
        """Raise ConfigError naming the first out-of-range field.

        Checked eagerly so a typo in a recipe fails before any data is loaded,
        not as a NaN or a shape error deep inside a training step.
        """
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"size must be an integer >= 1, got {self.size!r}")
        _check_pair("crop_scale", self.crop_scale)
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale!r}")
        _check_pair("crop_ratio", self.crop_ratio)
        low, high = self.crop_ratio
        if not 0 < low <= high < math.inf:
            raise ConfigError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio!r}")
        for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("brightness", "contrast", "saturation"):
            _check_range(name, getattr(self, name), 0.0, math.inf)
        _check_range("hue", self.hue, 0.0, 0.5)
        _check_pair("blur_sigma", self.blur_sigma)
        low, high = self.blur_sigma
        if not 0 < low <= high < math.inf:
            raise ConfigError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma!r}")
        _check_range("blur_kernel_frac", self.blur_kernel_frac, 0.0, 1.0)
        if self.blur_kernel_frac == 0:
            raise ConfigError("blur_kernel_frac must be > 0, got 0")
        _check_range("solarize_threshold", self.solarize_threshold, 0.0, 1.0)
        _check_triple("mean", self.mean)
        _check_triple("std", self.std)
        if not all(value > 0 for value in self.std):
            raise ConfigError(f"std must be > 0 for every channel, got {self.std!r}")

    @property
    def blur_kernel_size(self) -> int:
        """Odd kernel side covering `blur_kernel_frac` of the output side (SimCLR: 10%, 23 px at 224)."""
        side = max(1, round(self.blur_kernel_frac * self.size))
        return side if side % 2 == 1 else side + 1


def _check_range(name: str, value: object, low: float, high: float) -> None:
    """Reject non-numbers and values outside [low, high] (NaN fails the comparison too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def _check_pair(name: str, value: object) -> None:
    """Require a (min, max) pair of numbers so the range checks can unpack it."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"{name} must be a (min, max) pair, got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{name} must contain numbers, got {value!r}")


def _check_triple(name: str, value: object) -> None:
    """Require one finite number per RGB channel."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ConfigError(f"{name} must have 3 values (one per RGB channel), got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ConfigError(f"{name} must contain finite numbers, got {value!r}")


def simclr_view(
    size: int,
    strength: float = 1.0,
    blur: bool = True,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> AugmentConfig:
    """The SimCLR view recipe (Chen et al. 2020, Appendix A) at color strength `strength`.

    ImageNet: strength 1.0 with blur. CIFAR: the paper drops blur and uses
    strength 0.5, i.e. `simclr_view(32, 0.5, blur=False, mean=CIFAR10_MEAN, std=CIFAR10_STD)`.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength < math.inf:
        raise ConfigError(f"simclr_view strength must be a number >= 0, got {strength!r}")
    cfg = AugmentConfig(
        size=size,
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        hflip_p=0.5,
        jitter_p=0.8,
        brightness=0.8 * strength,
        contrast=0.8 * strength,
        saturation=0.8 * strength,
        hue=0.2 * strength,
        grayscale_p=0.2,
        blur_p=0.5 if blur else 0.0,
        blur_sigma=(0.1, 2.0),
        blur_kernel_frac=0.1,
        solarize_p=0.0,
        mean=tuple(mean),
        std=tuple(std),
    )
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------
# Random draws. Everything goes through `generator` on the images' device so
# CUDA runs never sync and a seeded generator reproduces the batch.
# ---------------------------------------------------------------------------


def _uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Uniform float32 samples in [low, high)."""
    return torch.rand(shape, generator=generator, device=device).mul_(high - low).add_(low)


def _coin(batch: int, p: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Per-sample boolean mask that is True with probability p (exactly never for 0, always for 1)."""
    return torch.rand(batch, generator=generator, device=device) < p


def _to_device(values: Tensor | tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant on `device` without a host sync.

    `torch.tensor(..., device="cuda")` is a blocking copy that waits for the
    whole CUDA stream; a non_blocking host-to-device copy of a tiny tensor only
    stages it. Copies towards the CPU stay blocking: a non_blocking one could be
    read before it lands.
    """
    return torch.as_tensor(values, dtype=dtype).to(device, non_blocking=device.type != "cpu")


def _as_image_mask(mask: Tensor) -> Tensor:
    """Reshape a (B,) mask so it broadcasts over (B, C, H, W)."""
    return mask.view(-1, 1, 1, 1)


def _apply_to_selected(
    images: Tensor, selected: Tensor, op: Callable[[Tensor, Tensor], Tensor], subset: bool | None = None
) -> Tensor:
    """`op(images[rows], rows)` for the selected samples; the others are returned bit-identical.

    On CPU (`subset` None -> True), reading the selection on the host is free,
    so the expensive op (blur, hue) only runs on the selected samples: 15%
    faster for the SimCLR ImageNet view. On CUDA that read would be a host
    sync, so the op runs on every sample and a mask picks the result.
    """
    if subset is None:
        subset = images.device.type == "cpu"
    if not subset:
        every = torch.arange(images.shape[0], device=images.device)
        return torch.where(_as_image_mask(selected), op(images, every), images)
    rows = selected.nonzero().squeeze(1)
    if rows.numel() == 0:
        return images
    if rows.numel() == images.shape[0]:
        return op(images, rows)
    return images.index_copy(0, rows, op(images[rows], rows))


# ---------------------------------------------------------------------------
# Geometry: random resized crop + flip.
# ---------------------------------------------------------------------------


def random_resized_crop_boxes(
    batch: int,
    height: int | Tensor,
    width: int | Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Sample (top, left, h, w) crop boxes per sample like torchvision's RandomResizedCrop.

    torchvision tries up to 10 (area, log-aspect) draws in a Python loop; here all
    10 candidates are drawn at once and the first valid one is picked with an
    argmax, so the cost is one small kernel per step even on CUDA. Samples with
    no valid candidate get torchvision's fallback: a center crop of the whole
    image clamped to the allowed aspect range. `height` and `width` are the
    image size shared by the batch, or (B,) tensors giving each sample's own
    size (a padded batch of images of different sizes: each box then lies
    inside its own image, at the top-left of the canvas). Returns float32
    (B, 4) holding integer values.
    """
    device = torch.device(device)
    if torch.is_tensor(height) or torch.is_tensor(width):  # one (height, width) per sample: (B,) columns
        heights = torch.as_tensor(height, dtype=torch.float32).to(device).expand(batch)
        widths = torch.as_tensor(width, dtype=torch.float32).to(device).expand(batch)
        fallback = _center_fallback_sizes(heights, widths, ratio)
        return _draw_boxes(batch, heights, widths, heights * widths, fallback, scale, ratio, generator, device)
    area = float(height * width)
    fallback_h, fallback_w = _center_fallback_size(height, width, ratio)
    return _draw_boxes(batch, height, width, area, (fallback_h, fallback_w), scale, ratio, generator, device)


def _draw_boxes(
    batch: int,
    height: int | Tensor,
    width: int | Tensor,
    area: float | Tensor,
    fallback: tuple[float | Tensor, float | Tensor],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """The draws of `random_resized_crop_boxes`; sizes are Python numbers or (B,) tensors.

    With tensors every per-sample size becomes a (B, 1) column against the
    (B, CROP_TRIES) candidates; with numbers the arithmetic is the scalar one, so
    batches of one size keep their exact previous boxes.
    """
    column = (lambda value: value.unsqueeze(1)) if torch.is_tensor(height) else (lambda value: value)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    target_area = _uniform((batch, CROP_TRIES), scale[0], scale[1], generator, device).mul_(column(area))
    aspect = _uniform((batch, CROP_TRIES), log_low, log_high, generator, device).exp_()
    widths = torch.sqrt(target_area * aspect).round_()
    heights = torch.sqrt(target_area / aspect).round_()
    valid = (widths > 0) & (widths <= column(width)) & (heights > 0) & (heights <= column(height))
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = valid.any(dim=1)
    fallback_h, fallback_w = fallback
    crop_w = torch.where(found, widths.gather(1, first).squeeze(1), fallback_w)
    crop_h = torch.where(found, heights.gather(1, first).squeeze(1), fallback_h)
    # Offsets like randint(0, side - crop + 1); the clamp guards the u -> 1 rounding edge.
    top = torch.floor(torch.rand(batch, generator=generator, device=device) * (height - crop_h + 1))
    left = torch.floor(torch.rand(batch, generator=generator, device=device) * (width - crop_w + 1))
    top = torch.where(found, torch.minimum(top, height - crop_h), torch.floor((height - crop_h) / 2))
    left = torch.where(found, torch.minimum(left, width - crop_w), torch.floor((width - crop_w) / 2))
    return torch.stack([top, left, crop_h, crop_w], dim=1)


def _center_fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """Largest centered box whose aspect lies in `ratio` (torchvision's fallback), as (h, w)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return float(round(width / min(ratio))), float(width)
    if in_ratio > max(ratio):
        return float(height), float(round(height * max(ratio)))
    return float(height), float(width)


def _center_fallback_sizes(heights: Tensor, widths: Tensor, ratio: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """`_center_fallback_size` per sample, for (B,) float32 heights and widths.

    Computed in float64 so the rounding matches the scalar version's Python
    arithmetic (torch.round, like round(), rounds halves to even).
    """
    h, w = heights.double(), widths.double()
    in_ratio = w / h
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    out_h = torch.where(narrow, torch.round(w / min(ratio)), h)
    out_w = torch.where(wide, torch.round(h * max(ratio)), w)
    return out_h.float(), out_w.float()


def crop_flip_grid(
    boxes: Tensor, flip: Tensor, height: int, width: int, size: int, image_sizes: Tensor | None = None
) -> Tensor:
    """`grid_sample` grid (B, size, size, 2) mapping each output pixel into its crop box, mirrored where `flip`.

    Equivalent to `affine_grid` with theta = [[±w/W, 0, cx], [0, h/H, cy]], but
    the matrix is diagonal, so x depends only on the column and y only on the
    row: building the grid by broadcasting skips affine_grid's batched matmul
    (which cost as much as the sampling itself on CPU). With
    align_corners=False, normalized -1/+1 are the outer pixel EDGES: a box
    [left, left + w) has center (2*left + w)/W - 1 and half-extent w/W, and
    output pixel j sits at (2j + 1)/size - 1. Negating the x half-extent
    mirrors the crop about its own center: the flip costs nothing.

    `image_sizes` (B, 2) gives each sample's own (h, w) inside a canvas of
    height x width padded at the bottom and right: sample points past the
    center of an image's last row or column are clamped onto it, so the
    padding never bleeds in (the canvas edge itself is left to 'border').
    """
    top, left, crop_h, crop_w = (column.view(-1, 1) for column in boxes.unbind(dim=1))
    base = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) * 2 + 1) / size - 1
    half_w = torch.where(flip.view(-1, 1), -crop_w, crop_w) / width
    grid_x = ((2 * left + crop_w) / width - 1) + half_w * base  # (B, size): per column
    grid_y = ((2 * top + crop_h) / height - 1) + (crop_h / height) * base  # (B, size): per row
    if image_sizes is not None:
        own_h, own_w = (column.view(-1, 1).to(boxes.dtype) for column in image_sizes.unbind(dim=1))
        grid_x = torch.minimum(grid_x, (2 * own_w - 1) / width - 1)  # center of the last own column
        grid_y = torch.minimum(grid_y, (2 * own_h - 1) / height - 1)
    batch = boxes.shape[0]
    return torch.stack(
        [grid_x.unsqueeze(1).expand(batch, size, size), grid_y.unsqueeze(2).expand(batch, size, size)], dim=-1
    )


def crop_flip(images: Tensor, boxes: Tensor, flip: Tensor, size: int, image_sizes: Tensor | None = None) -> Tensor:
    """Crop each sample's box, resize it to size x size and mirror it where `flip`, in ONE resampling.

    Bilinear `grid_sample` with the flip folded into the grid: measured
    1.5-2.5x faster on CPU than torchvision's `roi_align` plus a separate
    masked flip (benchmarks/augment_speed.py). The sample points are the pixel-center positions of torchvision's
    crop-then-resize (antialias=False); 'border' padding repeats edge pixels
    for points just outside the image when a crop touching the border is
    upscaled, and `image_sizes` (B, 2) does the same at each image's own edge
    in a padded batch (see `crop_flip_grid`). Shrunk crops are not antialiased, which is negligible for
    SimCLR's 256 -> 224 (at most 1.14x) but would alias for much larger inputs.
    """
    height, width = images.shape[-2:]
    grid = crop_flip_grid(boxes.to(images.dtype), flip, height, width, size, image_sizes)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------
# Color operations on float images in [0, 1]; factors are per-sample (B,) tensors.
# The public functions never modify their input; the private `inplace` path is
# used inside `apply_color_jitter` on tensors it already owns, saving one
# allocation and pass per blend.
# ---------------------------------------------------------------------------


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Luma (B, 1, H, W) with ITU-R 601-2 weights (a mul/add chain: measured faster than a 1x1 conv)."""
    red, green, blue = images.unbind(dim=1)
    gray = red * LUMA_WEIGHTS[0]
    gray.add_(green, alpha=LUMA_WEIGHTS[1]).add_(blue, alpha=LUMA_WEIGHTS[2])
    return gray.unsqueeze(1)


def _blend(images: Tensor, reference: Tensor, factor: Tensor, inplace: bool = False) -> Tensor:
    """torchvision's blend `factor * img + (1 - factor) * ref`, clamped to [0, 1].

    Computed as one `lerp` towards the reference with weight 1 - factor (one
    pass instead of three). torch's lerp evaluates `x + w * (ref - x)` for
    |w| < 0.5, so a factor of exactly 1 returns the input bit-identically: that
    is how unselected samples stay untouched without an extra select.
    """
    weight = (1 - factor).view(-1, 1, 1, 1)
    out = images.lerp_(reference, weight) if inplace else torch.lerp(images, reference, weight)
    return out.clamp_(0.0, 1.0)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Scale intensities by a per-sample factor (0 gives black, 1 is identity)."""
    return _blend(images, torch.zeros_like(images[:, :1, :1, :1]), factor)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with the mean of its own grayscale (0 gives flat gray)."""
    mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its grayscale (0 gives grayscale, >1 oversaturates)."""
    return _blend(images, rgb_to_grayscale(images), factor)


def _hue_sextant(images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hue in sextants (6 * HSV hue, range [-1, 5)), min, chroma (max - min) and max, each (B, H, W).

    Working in sextants and with min/chroma instead of saturation lets a hue
    shift skip a remainder, a division and a multiplication per pixel. Gray
    pixels (chroma 0) get hue 0 because their numerator is exactly 0.
    Channel-wise maximum/minimum are used because a reduction over dim 1
    (`aminmax`) measured ~20x slower on CPU.
    """
    red, green, blue = images.unbind(dim=1)
    value = torch.maximum(torch.maximum(red, green), blue)
    minimum = torch.minimum(torch.minimum(red, green), blue)
    chroma = value - minimum
    numerator = torch.where(
        value == red,
        green - blue,
        torch.where(value == green, (blue - red).add_(chroma, alpha=2.0), (red - green).add_(chroma, alpha=4.0)),
    )
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    return numerator.div_(safe_chroma), minimum, chroma, value


def _sextant_to_rgb(sextant: Tensor, minimum: Tensor, chroma: Tensor) -> Tensor:
    """Inverse of `_hue_sextant`: channel = min + chroma * pure_hue_channel(sextant).

    The pure-hue ramps are the branch-free R = |s - 3| - 1, G = 2 - |s - 2|,
    B = 2 - |s - 4| clamped to [0, 1], for s wrapped into [0, 6), instead of
    torchvision's six-way sector select. Any real sextant is accepted, so a hue
    shift is a plain add; the wrap uses floor (a full `remainder` is ~10x
    slower on CPU).
    """
    wrapped = sextant - torch.floor(sextant / 6).mul_(6)
    out = torch.empty((sextant.shape[0], 3, *sextant.shape[1:]), dtype=sextant.dtype, device=sextant.device)
    ramps = (
        (wrapped - 3).abs_().sub_(1),
        (wrapped - 2).abs_().neg_().add_(2),
        (wrapped - 4).abs_().neg_().add_(2),
    )
    for channel, ramp in enumerate(ramps):
        torch.addcmul(minimum, chroma, ramp.clamp_(0.0, 1.0), out=out[:, channel])
    # min + (max - min) can round one ulp above max; keep the [0, 1] contract exact.
    return out.clamp_(0.0, 1.0)


def rgb_to_hsv(images: Tensor) -> Tensor:
    """Batched RGB -> HSV for (B, 3, H, W) floats in [0, 1]; hue in [0, 1), gray pixels get hue 0."""
    sextant, _, chroma, value = _hue_sextant(images)
    hue = torch.where(sextant < 0, sextant + 6, sextant) / 6
    hue = torch.where(hue < 1, hue, torch.zeros_like(hue))  # -tiny + 6 rounds to 6
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Batched HSV -> RGB, the inverse of `rgb_to_hsv`."""
    hue, saturation, value = hsv.unbind(dim=1)
    chroma = saturation * value
    return _sextant_to_rgb(hue * 6, value - chroma, chroma)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate hue by a per-sample factor in [-0.5, 0.5] (fraction of the color wheel), keeping S and V."""
    sextant, minimum, chroma, _ = _hue_sextant(images)
    return _sextant_to_rgb(sextant.add_(6 * factor.view(-1, 1, 1)), minimum, chroma)


def _jitter_slot(
    images: Tensor, op: Tensor, factor: Tensor, needs_gray: bool, needs_mean: bool, inplace: bool
) -> Tensor:
    """Apply, per sample, whichever of brightness/contrast/saturation sits in this slot.

    The three ops are all blends `f * x + (1 - f) * ref` that differ only in the
    reference (0, mean gray, gray), so a slot builds one reference per sample
    and runs one blend for the whole batch. A per-sample random order then
    costs a few cheap blends instead of every op at every position. Samples
    with nothing to do in this slot come with factor 1 (identity).
    """
    reference = torch.zeros_like(images[:, :1, :1, :1])
    if needs_gray:
        gray = rgb_to_grayscale(images)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True) if needs_mean else reference
        is_saturation = _as_image_mask(op == _SATURATION).to(gray.dtype)
        is_contrast = _as_image_mask(op == _CONTRAST).to(gray.dtype)
        reference = torch.addcmul(mean * is_contrast, gray, is_saturation)
    return _blend(images, reference, factor, inplace=inplace)


@dataclass
class JitterParams:
    """Per-sample color-jitter draws, separated from their application so they can be tested.

    selected: (B,) bool, samples that are jittered at all.
    factors: (B, 4) brightness, contrast, saturation, hue factors (identity where not selected).
    order: (B, len(ops)) op ids (0 brightness, 1 contrast, 2 saturation, 3 hue) in application order.
    ops: the enabled op ids (host-side, decides which kernels run).
    """

    selected: Tensor
    factors: Tensor
    order: Tensor
    ops: tuple[int, ...]

    def __getitem__(self, samples: slice) -> JitterParams:
        """The parameters of a contiguous group of samples."""
        return JitterParams(self.selected[samples], self.factors[samples], self.order[samples], self.ops)


def sample_color_jitter(
    batch: int,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    p: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> JitterParams:
    """Draw torchvision-ColorJitter parameters per sample, including a per-sample op order.

    Ops with strength 0 are left out entirely (they would be the identity).
    """
    device = torch.device(device)
    strengths = (brightness, contrast, saturation, hue)
    ops = tuple(op for op, strength in enumerate(strengths) if strength > 0)
    selected = _coin(batch, p, generator, device)
    columns = [_uniform((batch,), max(0.0, 1.0 - s), 1.0 + s, generator, device) for s in strengths[:3]]
    columns.append(_uniform((batch,), -hue, hue, generator, device))
    factors = torch.stack(columns, dim=1)
    identity = _to_device(_IDENTITY_FACTORS, device, factors.dtype).expand_as(factors)
    factors = torch.where(selected.unsqueeze(1), factors, identity)
    # A uniformly random permutation per sample: argsort of i.i.d. keys.
    ranks = torch.argsort(torch.rand((batch, len(ops)), generator=generator, device=device), dim=1)
    order = _to_device(ops, device, torch.long)[ranks]
    return JitterParams(selected=selected, factors=factors, order=order, ops=ops)


def apply_color_jitter(images: Tensor, params: JitterParams) -> Tensor:
    """Apply each sample's factors in each sample's own order, batched (no host sync on CUDA).

    Hue, the one expensive non-blend op, is evaluated once for the whole batch:
    each sample runs the blends that precede hue in its order in "pre-hue"
    slots and the rest in "post-hue" slots. With all four ops that is 3 + 3
    cheap blend slots and one hue pass. Unselected samples (factor 1 in every
    slot, hue masked out) pass through bit-identically.
    """
    if not params.ops:
        return images
    ops, order, factors = params.ops, params.order, params.factors
    needs_gray, needs_mean = _CONTRAST in ops or _SATURATION in ops, _CONTRAST in ops
    x = images

    def run_slot(position: int, active: Tensor | None) -> Tensor:
        op = order[:, position]
        keep = op != _HUE if active is None else active & (op != _HUE)
        factor = factors.gather(1, op.unsqueeze(1)).squeeze(1)
        factor = torch.where(keep, factor, torch.ones_like(factor))
        return _jitter_slot(x, op, factor, needs_gray, needs_mean, inplace=x is not images)

    if _HUE not in ops:
        for position in range(len(ops)):
            x = run_slot(position, None)
        return x
    hue_position = (order == _HUE).to(torch.uint8).argmax(dim=1)
    for position in range(len(ops) - 1):
        x = run_slot(position, hue_position > position)
    x = _apply_to_selected(x, params.selected, lambda rows_x, rows: adjust_hue(rows_x, factors[rows, _HUE]))
    for position in range(1, len(ops)):
        x = run_slot(position, hue_position < position)
    return x


def color_jitter(
    images: Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    p: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """torchvision-style ColorJitter applied with probability p, with per-sample factors AND order.

    torchvision shuffles the four ops independently per image; doing the same
    here costs only a few extra cheap blends (see `apply_color_jitter`), so
    unlike kornia's one-order-per-batch the order is drawn per sample.
    """
    if p <= 0 or max(brightness, contrast, saturation, hue) <= 0:
        return images
    params = sample_color_jitter(
        images.shape[0], brightness, contrast, saturation, hue, p, generator, images.device
    )
    return apply_color_jitter(images, params)


# ---------------------------------------------------------------------------
# Other pixel ops.
# ---------------------------------------------------------------------------


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each sample with its own sigma: separable grouped convolution, reflect padding.

    Folding the batch into channels (groups = B * C) lets one depthwise conv
    apply B different kernels at once. The kernel matches torchvision's
    GaussianBlur (unnormalized Gaussian at integer offsets, then normalized).
    """
    batch, channels, height, width = images.shape
    half = kernel_size // 2
    if half == 0:
        return images
    offsets = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - half
    kernel = torch.exp(-0.5 * (offsets / sigma.to(images.dtype).unsqueeze(1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    groups = batch * channels
    padded = F.pad(images.reshape(1, groups, height, width), (half, half, half, half), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(groups, 1, kernel_size, 1), groups=groups)
    blurred = F.conv2d(blurred, kernel.view(groups, 1, 1, kernel_size), groups=groups)
    return blurred.view(batch, channels, height, width)


def solarize(images: Tensor, threshold: float) -> Tensor:
    """Invert pixels at or above `threshold` (BYOL's solarization)."""
    return torch.where(images >= threshold, 1 - images, images)


def normalize(images: Tensor, mean: Tensor | tuple[float, ...], std: Tensor | tuple[float, ...]) -> Tensor:
    """Per-channel (x - mean) / std; accepts tuples or (3,)/(1,3,1,1) tensors."""
    mean = _to_device(mean, images.device, images.dtype).view(1, -1, 1, 1)
    std = _to_device(std, images.device, images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def _check_images(images: Tensor) -> None:
    """Require an RGB (B, 3, H, W) uint8 or float batch.

    A channels-last or grayscale batch would otherwise fail later with an
    obscure broadcasting error.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected an RGB batch of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"expected uint8 or floating images, got {images.dtype}")


def to_float_image(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; floating input is taken as already in [0, 1]."""
    _check_images(images)
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Fail clearly when the generator lives on another device than the images."""
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but images are on {device}; "
            "create it with torch.Generator(device=images.device)"
        )


@dataclass
class AugmentParams:
    """Every random draw of one view of a batch; ops that are off in the config hold None.

    Drawing everything up front makes the result independent of how the batch
    is later split for application, and lets tests build exact cases by hand.
    """

    boxes: Tensor  # (B, 4) top, left, height, width of each crop, in input pixels
    flip: Tensor  # (B,) bool
    jitter: JitterParams | None
    grayscale: Tensor | None  # (B,) bool
    blur: Tensor | None  # (B,) bool
    blur_sigma: Tensor | None  # (B,) float
    solarize: Tensor | None  # (B,) bool
    image_sizes: Tensor | None = None  # (B, 2) each image's (h, w) in a padded batch; None: the whole canvas

    def __getitem__(self, samples: slice) -> AugmentParams:
        """The parameters of a contiguous group of samples."""

        def part(value: Tensor | JitterParams | None) -> Tensor | JitterParams | None:
            return None if value is None else value[samples]

        return AugmentParams(
            boxes=self.boxes[samples],
            flip=self.flip[samples],
            jitter=part(self.jitter),
            grayscale=part(self.grayscale),
            blur=part(self.blur),
            blur_sigma=part(self.blur_sigma),
            solarize=part(self.solarize),
            image_sizes=part(self.image_sizes),
        )


class Augment(torch.nn.Module):
    """One random view of a uint8 batch, computed on the batch's device with per-sample randomness.

    Call it inside the training step (twice for two views). The whole forward
    runs with autocast disabled so the view stays float32 under a bf16/fp16
    step: the color math would lose visible precision in half precision.
    Output: float32 (B, 3, size, size), normalized with cfg.mean/cfg.std.
    """

    cpu_chunk_elements: int = 1 << 20
    """Float elements per sample group on CPU (4 MB). Measured single-threaded on a 2-core EPYC
    (1 MB L2/core, 32 MB L3) for 64 x 256^2 -> 224: 2-3x faster than one full-batch group and
    1.1-1.3x faster than 2 MB or 8 MB groups. Other devices use the whole batch in one group."""

    def __init__(self, cfg: AugmentConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return repr(self.cfg)

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, image_sizes: Tensor | None = None
    ) -> Tensor:
        """Augment a (B, 3, H, W) uint8 (or [0, 1] float) batch; draws from `generator` or the default RNG.

        `image_sizes` (B, 2) int: each sample's own (h, w) when the batch holds images of different
        sizes padded at the bottom and right (the streaming loader's batches); each crop is then
        drawn inside its own image, as RandomResizedCrop does on the whole decoded image.
        """
        _check_images(images)
        batch, _, height, width = images.shape
        params = self.sample_params(batch, height, width, generator, images.device, image_sizes)
        return self.apply_params(images, params)

    def sample_params(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        image_sizes: Tensor | None = None,
    ) -> AugmentParams:
        """Draw all per-sample parameters, in a fixed order, from `generator` on `device`.

        With `image_sizes` (B, 2) the crop boxes lie inside each sample's own (h, w) at the
        top-left of the height x width canvas.
        """
        device = torch.device(device)
        _check_generator(generator, device)
        cfg = self.cfg
        if image_sizes is not None:
            image_sizes = image_sizes.to(device)
            height, width = image_sizes[:, 0], image_sizes[:, 1]
        boxes = random_resized_crop_boxes(batch, height, width, cfg.crop_scale, cfg.crop_ratio, generator, device)
        flip = _coin(batch, cfg.hflip_p, generator, device)
        jitter = None
        if cfg.jitter_p > 0 and max(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) > 0:
            jitter = sample_color_jitter(
                batch, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.jitter_p, generator, device
            )
        grayscale = _coin(batch, cfg.grayscale_p, generator, device) if cfg.grayscale_p > 0 else None
        blur = blur_sigma = None
        if cfg.blur_p > 0 and cfg.blur_kernel_size >= 3:
            blur = _coin(batch, cfg.blur_p, generator, device)
            blur_sigma = _uniform((batch,), *cfg.blur_sigma, generator, device)
        solarize_mask = _coin(batch, cfg.solarize_p, generator, device) if cfg.solarize_p > 0 else None
        return AugmentParams(boxes, flip, jitter, grayscale, blur, blur_sigma, solarize_mask, image_sizes)

    def apply_params(self, images: Tensor, params: AugmentParams) -> Tensor:
        """Apply drawn parameters: on CPU group by group (cache-sized), on other devices all at once."""
        _check_images(images)
        batch = images.shape[0]
        size = self.cfg.size
        with torch.autocast(device_type=images.device.type, enabled=False):
            out = torch.empty((batch, 3, size, size), dtype=torch.float32, device=images.device)
            group = self._group_size(images)
            for start in range(0, batch, group):
                samples = slice(start, min(start + group, batch))
                self._apply_group(images[samples], params[samples], out[samples])
            return out

    def _group_size(self, images: Tensor) -> int:
        """Samples per group: the whole batch off-CPU, else enough to fill `cpu_chunk_elements`."""
        if images.device.type != "cpu":
            return max(1, images.shape[0])
        per_sample = 3 * max(images.shape[2] * images.shape[3], self.cfg.size**2)
        return max(1, self.cpu_chunk_elements // per_sample)

    def _apply_group(self, images: Tensor, params: AugmentParams, out: Tensor) -> None:
        """Run the pipeline on one group of samples and write the normalized result into `out`."""
        cfg = self.cfg
        x = crop_flip(to_float_image(images), params.boxes, params.flip, cfg.size, params.image_sizes)
        if params.jitter is not None:
            x = apply_color_jitter(x, params.jitter)
        if params.grayscale is not None:
            x = torch.where(_as_image_mask(params.grayscale), rgb_to_grayscale(x).expand_as(x), x)
        if params.blur is not None and params.blur_sigma is not None:
            sigma, kernel_size = params.blur_sigma, cfg.blur_kernel_size
            x = _apply_to_selected(x, params.blur, lambda rows_x, rows: gaussian_blur(rows_x, sigma[rows], kernel_size))
        if params.solarize is not None:
            x = torch.where(_as_image_mask(params.solarize), solarize(x, cfg.solarize_threshold), x)
        mean = _to_device(self.mean, x.device, x.dtype)
        std = _to_device(self.std, x.device, x.dtype)
        torch.div(x.sub_(mean), std, out=out)


def pad_images(images: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Images (C, h, w) of one batch on one canvas: stacked as they are when they share a size
    (sizes None), else zero-padded at the bottom and right to the largest (H, W), with each
    image's own (h, w) as ``image_sizes`` (B, 2) for ``Augment`` to crop inside."""
    sizes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.int64).reshape(-1, 2)
    if bool((sizes == sizes[0]).all()):
        return torch.stack(images), None
    height, width = (int(side) for side in sizes.max(dim=0).values)
    canvas = torch.zeros((len(images), images[0].shape[0], height, width), dtype=images[0].dtype)
    for slot, image in zip(canvas, images):
        slot[:, : image.shape[1], : image.shape[2]] = image
    return canvas, sizes


def _eval_resize_side(size: int) -> int:
    """Shorter side before the center crop: 256 for 224 (ratio 0.875); no upscale margin for small images."""
    return round(size / EVAL_CROP_FRACTION) if size >= EVAL_RESIZE_MIN_SIZE else size


def eval_transform(
    images: Tensor,
    size: int,
    mean: tuple[float, float, float] | Tensor,
    std: tuple[float, float, float] | Tensor,
) -> Tensor:
    """Deterministic eval preprocessing of a batch: resize shorter side, center crop, normalize.

    Already-square batches of the right side are only normalized, so CIFAR
    evaluation sees the exact pixels. Resizing uses antialiased bilinear
    interpolation like torchvision's Resize on tensors.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    with torch.autocast(device_type=images.device.type, enabled=False):
        x = to_float_image(images)
        height, width = x.shape[-2:]
        if height != size or width != size:
            x = _resize_shorter_side(x, _eval_resize_side(size))
            x = _center_crop(x, size)
        return normalize(x, mean, std)


def _resize_shorter_side(images: Tensor, side: int) -> Tensor:
    """Resize so the shorter side equals `side`, keeping the aspect (torchvision's int() rounding)."""
    height, width = images.shape[-2:]
    if min(height, width) == side:
        return images
    if height <= width:
        new_size = (side, int(side * width / height))
    else:
        new_size = (int(side * height / width), side)
    return F.interpolate(images, size=new_size, mode="bilinear", align_corners=False, antialias=True)


def _center_crop(images: Tensor, size: int) -> Tensor:
    """Central size x size window, offsets rounded like torchvision's center_crop."""
    height, width = images.shape[-2:]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]
