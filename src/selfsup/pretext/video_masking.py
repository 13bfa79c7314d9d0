"""Token masking for video transformers: tubes, a hidden future, and V-JEPA's 3-D multi-block masks.

A clip of ``T`` frames, ``H x W`` pixels, cut into tubelets of ``tubelet x p x p`` gives a token grid
``(t, h, w) = (T // tubelet, H // p, W // p)`` (16 frames, tubelet 2, 224 px, patch 16: 8 x 14 x 14).
Tokens are numbered t-major, the order of a ``Conv3d`` patch embedding flattened with
``.flatten(2)``: token ``(ti, hi, wi)`` has index ``(ti * h + hi) * w + wi``, so one temporal slice
is a run of ``h * w`` consecutive indices.

Generators (paper, official code the details follow):

* :func:`tube_masking`: VideoMAE tube masking (Tong, Song, Wang, Wang, 2022, "VideoMAE: Masked
  Autoencoders are Data-Efficient Learners for Self-Supervised Video Pre-Training", NeurIPS, sec. 3.3),
  ``MCG-NJU/VideoMAE masking_generator.py:TubeMaskingGenerator``.
* :func:`future_masking_3d`: the last temporal slices hidden (predict the future from the past).
* :func:`multiblock3d_masking`: V-JEPA 3-D multi-block masking (Bardes, Garrido, Ponce, Chen, Rabbat,
  LeCun, Assran, Ballas, 2024, "Revisiting Feature Prediction for Learning Visual Representations
  from Video", TMLR, sec. 3.2), ``facebookresearch/jepa src/masks/multiblock3d.py``; V-JEPA 2 uses the
  same generator and configs (``facebookresearch/vjepa2 src/masks/multiseq_multiblock3d.py``).

As in :mod:`selfsup.pretext.masking`, every random quantity comes from one optional
``torch.Generator`` and masks are built on its device (or the one asked for); a seeded generator
reproduces a batch exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from selfsup.errors import ConfigError
from selfsup.pretext.masking import MaskSet, _device

__all__ = [
    "VJEPA_ASPECT",
    "VJEPA_BLOCKS",
    "Multiblock3DMasks",
    "VideoGrid",
    "future_masking_3d",
    "multiblock3d_masking",
    "tube_masking",
    "video_grid",
]

VideoGrid = tuple[int, int, int]

VJEPA_BLOCKS: tuple[tuple[int, float], ...] = ((8, 0.15), (2, 0.7))
"""The two mask configs of V-JEPA's ViT-L/16 pretraining (``configs/pretrain/vitl16.yaml``, kept by
V-JEPA 2): 8 blocks of 15% of the frame ("short-range") and 2 blocks of 70% ("long-range"), each
block spanning the whole clip in time."""

VJEPA_ASPECT: tuple[float, float] = (0.75, 1.5)
"""Block aspect-ratio range (height / width) of both V-JEPA configs."""

CONTEXT_RETRIES = 100
"""Redraws of a sample whose blocks leave no context token before giving up (the official code
redraws without limit: ``while empty_context``)."""


# ----------------------------------------------------------------------------------------------
# helpers


def video_grid(grid: Sequence[int]) -> VideoGrid:
    """``grid`` as a (t, h, w) tuple of positive ints; ConfigError otherwise."""
    try:
        t, h, w = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ConfigError(f"video token grid must be (t, h, w), got {grid!r}") from None
    if t < 1 or h < 1 or w < 1:
        raise ConfigError(f"video token grid must be positive, got {tuple(grid)!r}")
    return t, h, w


def _check_batch(batch: int) -> None:
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")


def _inverse(ids_shuffle: Tensor) -> Tensor:
    """The inverse permutation of every row of ``ids_shuffle`` (B, N): one scatter, no sort."""
    batch, n = ids_shuffle.shape
    index = torch.arange(n, device=ids_shuffle.device).expand(batch, n)
    return torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, index)


def _lowest_true(mask: Tensor, count: int) -> Tensor:
    """The ``count`` lowest column indices that are True in each row of ``mask`` (B, N), ascending
    (every row must hold at least ``count`` True): the official ``nonzero(...)[:count]``. A running
    count picks them, no sort; ``nonzero`` lists them row by row, ascending."""
    take = mask & (mask.cumsum(1) <= count)
    return take.nonzero()[:, 1].view(mask.shape[0], count)


def _range(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """A number or a (lo, hi) pair as a (lo, hi) pair of floats."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number or a (lo, hi) pair, got {value!r}") from None
    if lo > hi:
        raise ConfigError(f"{name} must have lo <= hi, got {value!r}")
    return lo, hi


# ----------------------------------------------------------------------------------------------
# VideoMAE


def tube_masking(batch: int, grid: Sequence[int], ratio: float, *,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> MaskSet:
    """VideoMAE tube masking (Tong et al., 2022, NeurIPS, sec. 3.3; official
    ``TubeMaskingGenerator``): every sample hides the same random set of spatial positions in every
    temporal slice, so each hidden token's whole tube through time is hidden and it cannot be
    copied from a neighbouring frame.

    Per slice ``m = int(ratio * h * w)`` positions are hidden, the count VideoMAE uses
    (``num_masks_per_frame = int(mask_ratio * num_patches_per_frame)``, ``int`` truncation, so
    0.9 of 14 x 14 hides 176 of 196 positions per slice), ``M = t * m`` tokens in all, the same for
    every sample. Per sample, noise u ~ U(0, 1)^(h*w) ranks the spatial positions
    (``argsort(u)``); the last m are hidden.

    Returns a :class:`~selfsup.pretext.masking.MaskSet` in MAE conventions: ``keep`` (B, N - M)
    and ``masked`` (B, M) in shuffled order (slice by slice, each slice in the spatial shuffle
    order), ``mask`` (B, N) True = hidden, and ``ids_restore`` (B, N) the inverse of the
    permutation ``cat([keep, masked])``. Paper defaults: ratio 0.9 (K400, SSv2), 0.75 (UCF101,
    HMDB51).
    """
    t, h, w = video_grid(grid)
    _check_batch(batch)
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"tube mask ratio must be in (0, 1), got {ratio}")
    spatial = h * w
    per_slice = int(ratio * spatial)
    if per_slice == 0:
        raise ConfigError(f"tube mask ratio {ratio} hides no position of a {h} x {w} slice")
    device = _device(device, generator)
    order = torch.argsort(torch.rand((batch, spatial), generator=generator, device=device), dim=1)
    offsets = (torch.arange(t, device=device) * spatial).view(1, t, 1)
    keep = (offsets + order[:, None, : spatial - per_slice]).flatten(1)
    masked = (offsets + order[:, None, spatial - per_slice:]).flatten(1)
    ids_restore = _inverse(torch.cat([keep, masked], dim=1))
    mask = torch.zeros((batch, t * spatial), dtype=torch.bool, device=device)
    mask.scatter_(1, masked, True)
    return MaskSet(keep=keep, masked=masked, mask=mask, ids_restore=ids_restore)


def future_masking_3d(batch: int, grid: Sequence[int], hidden_slices: int, *,
                      device: torch.device | str | None = None) -> MaskSet:
    """The last ``hidden_slices`` temporal slices hidden in every sample (future prediction: the
    visible past predicts the hidden future). Deterministic, so ``keep`` / ``masked`` are in
    ascending order and ``ids_restore`` is the identity. ``hidden_slices`` must leave at least one
    slice visible."""
    t, h, w = video_grid(grid)
    _check_batch(batch)
    if not 1 <= hidden_slices < t:
        raise ConfigError(f"hidden_slices must be in [1, {t - 1}] for {t} temporal slices, "
                          f"got {hidden_slices}")
    device = torch.device("cpu") if device is None else torch.device(device)
    n, visible = t * h * w, (t - hidden_slices) * h * w
    index = torch.arange(n, device=device).repeat(batch, 1)
    mask = index >= visible
    return MaskSet(keep=index[:, :visible].clone(), masked=index[:, visible:].clone(), mask=mask,
                   ids_restore=index)


# ----------------------------------------------------------------------------------------------
# V-JEPA


@dataclass
class Multiblock3DMasks:
    """The masks of one V-JEPA mask config for a batch (the official collator's
    ``(masks_enc[i], masks_pred[i])`` pair plus boolean forms).

    context: (B, Kc) long, ascending token indices the context encoder sees
    target:  (B, Kt) long, ascending token indices the predictor predicts (its mask tokens)
    mask:    (B, N) bool, True exactly at ``target``'s indices
    hidden:  (B, N) bool, the union of the config's blocks (and of the slices past
             ``max_temporal_keep``) before the same-length truncation (``context`` is taken from
             ``~hidden``, ``target`` from ``hidden``)
    """

    context: Tensor
    target: Tensor
    mask: Tensor
    hidden: Tensor


def _block_size(u: Sequence[float], temporal: tuple[float, float], spatial: tuple[float, float],
                aspect: tuple[float, float], t: int, h: int, w: int) -> tuple[int, int, int]:
    """V-JEPA ``_sample_block_size``: three separate uniform draws give the temporal scale, the
    spatial scale and the aspect ratio (I-JEPA used one draw for both of its)."""
    bt = max(1, int(t * (temporal[0] + u[0] * (temporal[1] - temporal[0]))))
    keep = int(h * w * (spatial[0] + u[1] * (spatial[1] - spatial[0])))
    ratio = aspect[0] + u[2] * (aspect[1] - aspect[0])
    bh = round(math.sqrt(keep * ratio))
    bw = round(math.sqrt(keep / ratio))
    return bt, min(max(bh, 1), h), min(max(bw, 1), w)


def _draw_hidden(rows: int, count: int, size: tuple[int, int, int], grid: VideoGrid,
                 context_frames: int, generator: torch.Generator | None,
                 device: torch.device) -> Tensor:
    """(rows, N) bool: per row the union of ``count`` blocks of ``size`` (bt, bh, bw) placed
    uniformly (start ~ U{0..t-bt}, top ~ U{0..h-bh}, left ~ U{0..w-bw}, as the official
    ``torch.randint(0, t - bt + 1)``), plus every slice from ``context_frames`` on. The blocks'
    token indices are scattered into the mask at once (overlaps write True twice)."""
    t, h, w = grid
    bt, bh, bw = size
    pos = torch.rand((3, rows, count, 1), generator=generator, device=device)
    start = torch.floor(pos[0] * (t - bt + 1)).long().clamp_(max=t - bt)
    top = torch.floor(pos[1] * (h - bh + 1)).long().clamp_(max=h - bh)
    left = torch.floor(pos[2] * (w - bw + 1)).long().clamp_(max=w - bw)
    in_t = start + torch.arange(bt, device=device)  # (rows, count, bt)
    in_h = top + torch.arange(bh, device=device)
    in_w = left + torch.arange(bw, device=device)
    index = (in_t[..., :, None, None] * h + in_h[..., None, :, None]) * w + in_w[..., None, None, :]
    hidden = torch.zeros((rows, t * h * w), dtype=torch.bool, device=device)
    hidden.scatter_(1, index.view(rows, -1), True)
    hidden[:, context_frames * h * w:] = True
    return hidden


def _can_cover(temporal: tuple[float, float], spatial: tuple[float, float],
               aspect: tuple[float, float], context_frames: int, t: int, h: int, w: int) -> bool:
    """Whether one block of the config can span all ``context_frames`` and the whole h x w frame
    (every context token hidden in every sample: the official loop would never end). A block is
    h x w when round(sqrt(k a)) >= h and round(sqrt(k / a)) >= w, i.e. a in
    [(h - 1/2)^2 / k, k / (w - 1/2)^2], with k = int(h w s_hi) the largest area (the interval
    only widens with k); a side of 1 always spans a grid side of 1."""
    if max(1, int(t * temporal[1])) < context_frames:
        return False
    keep = int(h * w * spatial[1])
    lo = 0.0 if h == 1 else ((h - 0.5) ** 2 / keep if keep > 0 else math.inf)
    hi = math.inf if w == 1 else (keep / (w - 0.5) ** 2 if keep > 0 else -math.inf)
    return max(lo, aspect[0]) <= min(hi, aspect[1])


def multiblock3d_masking(batch: int, grid: Sequence[int], *,
                         blocks: Sequence[tuple[int, float | tuple[float, float]]] = VJEPA_BLOCKS,
                         aspect: tuple[float, float] = VJEPA_ASPECT,
                         temporal_scale: tuple[float, float] = (1.0, 1.0),
                         max_temporal_keep: float = 1.0, max_keep: int | None = None,
                         generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> list[Multiblock3DMasks]:
    """V-JEPA 3-D multi-block masking (Bardes et al., 2024, TMLR, sec. 3.2; official
    ``multiblock3d.MaskCollator``), one :class:`Multiblock3DMasks` per entry of ``blocks``.

    Each entry ``(num_blocks, spatial_scale)`` is one mask config (``spatial_scale`` a number or a
    (lo, hi) range); ``aspect``, ``temporal_scale``, ``max_temporal_keep`` and ``max_keep`` apply to
    every config. Per config and per batch, ONE block size is drawn (``_sample_block_size``, three
    separate draws u0, u1, u2 ~ U(0, 1)):

        bt = max(1, int(t * (ts_lo + u0 (ts_hi - ts_lo)))),   k = int(h * w * (s_lo + u1 (s_hi - s_lo))),
        a = a_lo + u2 (a_hi - a_lo),   bh = min(round(sqrt(k a)), h),   bw = min(round(sqrt(k / a)), w);

    per sample, ``num_blocks`` blocks of that size are placed independently and uniformly
    (start ~ U{0..t-bt}, top ~ U{0..h-bh}, left ~ U{0..w-bw}; they may overlap). The target is the
    union of the blocks, plus, when ``max_temporal_keep`` < 1, every slice from
    ``max(1, int(t * max_temporal_keep))`` on; the context is its complement. A sample left with
    no context is redrawn (as the official ``while empty_context``). Finally every context is cut
    to the batch's shortest (and to ``max_keep``), every target to the batch's shortest, keeping
    the LOWEST token indices (the official ``cm[:min_keep]`` on ascending ``nonzero``), so that
    they stack into (B, K) tensors; truncation thus drops tokens of the last slices first.

    Defaults are the ViT-L/16 configs (``configs/pretrain/vitl16.yaml``): 8 blocks of scale 0.15 and
    2 blocks of scale 0.7, aspect (0.75, 1.5), temporal scale 1 (blocks span every slice),
    max_temporal_keep 1, no max_keep. On an 8 x 14 x 14 grid a config-0 block holds 29 of 196
    positions of every slice, a config-1 block 137.

    Departures: the official block size comes from a generator seeded with the iteration count
    and the positions from torch's global generator; here all come from ``generator``. Block sides
    that round to 0 (areas of one patch with extreme aspect) are raised to 1. A config whose
    largest block can cover every context token raises ConfigError (the official loop never ends),
    as does a batch still without context after ``CONTEXT_RETRIES`` redraws.
    """
    t, h, w = video_grid(grid)
    _check_batch(batch)
    a_range = _range(aspect, "aspect")
    t_range = _range(temporal_scale, "temporal_scale")
    if a_range[0] <= 0:
        raise ConfigError(f"aspect must be positive, got {aspect!r}")
    if not (0.0 < t_range[0] and t_range[1] <= 1.0):
        raise ConfigError(f"temporal_scale must lie in (0, 1], got {temporal_scale!r}")
    if not 0.0 < max_temporal_keep <= 1.0:
        raise ConfigError(f"max_temporal_keep must be in (0, 1], got {max_temporal_keep}")
    if max_keep is not None and max_keep < 1:
        raise ConfigError(f"max_keep must be >= 1 or None, got {max_keep}")
    if len(blocks) == 0:
        raise ConfigError("blocks must hold at least one (num_blocks, spatial_scale) config")
    context_frames = max(1, int(t * max_temporal_keep))
    configs = []
    for entry in blocks:
        try:
            count, scale = entry
        except (TypeError, ValueError):
            raise ConfigError(f"each blocks entry must be (num_blocks, spatial_scale), got {entry!r}") from None
        s_range = _range(scale, "spatial_scale")
        if int(count) != count or count < 1:
            raise ConfigError(f"num_blocks must be a positive int, got {count!r}")
        if not (0.0 < s_range[0] and s_range[1] <= 1.0):
            raise ConfigError(f"spatial_scale must lie in (0, 1], got {scale!r}")
        if _can_cover(t_range, s_range, a_range, context_frames, t, h, w):
            raise ConfigError(f"blocks too large: ({count}, {scale!r}) with aspect {aspect!r} can "
                              f"hide the whole {t} x {h} x {w} grid, leaving no context")
        configs.append((int(count), s_range))

    device = _device(device, generator)
    n = t * h * w
    out = []
    for count, s_range in configs:
        u = torch.rand(3, generator=generator, device=device).tolist()
        size = _block_size(u, t_range, s_range, a_range, t, h, w)
        hidden = _draw_hidden(batch, count, size, (t, h, w), context_frames, generator, device)
        empty = hidden.all(1)
        for _ in range(CONTEXT_RETRIES):
            if not bool(empty.any()):
                break
            redo = empty.nonzero().squeeze(1)
            hidden[redo] = _draw_hidden(redo.numel(), count, size, (t, h, w), context_frames,
                                        generator, device)
            empty = hidden.all(1)
        else:
            if bool(empty.any()):
                raise ConfigError(f"blocks too large: ({count}, {s_range}) left no context token in "
                                  f"{CONTEXT_RETRIES} draws on a {t} x {h} x {w} grid")
        hidden_count = hidden.sum(1)
        keep_context = int((n - hidden_count).min())
        if max_keep is not None:
            keep_context = min(keep_context, max_keep)
        keep_target = int(hidden_count.min())
        context = _lowest_true(~hidden, keep_context)
        target = _lowest_true(hidden, keep_target)
        mask = torch.zeros((batch, n), dtype=torch.bool, device=device).scatter_(1, target, True)
        out.append(Multiblock3DMasks(context=context, target=target, mask=mask, hidden=hidden))
    return out
