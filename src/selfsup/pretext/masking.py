"""Patch masking for masked-image modeling and JEPA methods, batched and on device.

Every generator here draws the masks of a whole batch at once from one ``torch.Generator``:
per-sample random quantities are tensors of shape (B, ...), rectangles are compared against
index ranges by broadcasting, and overlap counts come from 2-D prefix sums (integral images).
Python loops run only over a fixed number of placement rounds or attempts, never over samples,
so the cost barely grows with the batch and a seeded generator reproduces a batch exactly.

Patches are numbered row-major on the (gh, gw) patch grid: patch ``i`` sits at row ``i // gw``,
column ``i % gw``, the order of a ViT's patch tokens.

Generators (paper, official code the details follow):

* :func:`random_masking`: MAE (He, Chen, Xie, Li, Dollar, Girshick, 2022, "Masked Autoencoders
  Are Scalable Vision Learners", CVPR), ``models_mae.MaskedAutoencoderViT.random_masking``.
* :func:`block_masking`: BEiT blockwise masking (Bao, Dong, Piao, Wei, 2022, "BEiT: BERT
  Pre-Training of Image Transformers", ICLR, Algorithm 1), ``beit/masking_generator.py``; the
  same generator serves iBOT/DINOv2 (``dinov2/data/masking.py``) with a per-sample count.
* :func:`multiblock_masking`: I-JEPA multi-block masking (Assran, Duval, Misra, Bojanowski,
  Vincent, Rabbat, LeCun, Ballas, 2023, "Self-Supervised Learning from Images with a
  Joint-Embedding Predictive Architecture", CVPR), ``ijepa/src/masks/multiblock.py``.
* :func:`inverse_block_masking`: data2vec 2.0 inverse block masking (Baevski, Babu, Hsu, Auli,
  2023, "Efficient Self-supervised Learning with Contextualized Target Representations for
  Vision, Speech and Language", ICML), ``fairseq/data/data_utils.py:compute_block_mask_2d``
  with ``inverse_mask=True``.
* :func:`span_masking` / :func:`future_masking`: masks over a 1-D sequence of patches (time
  series): contiguous spans at random places, or the last patches (a forecast-shaped mask).
* :func:`wav2vec_span_masking`: wav2vec 2.0 / data2vec audio time masking (Baevski, Zhou, Mohamed,
  Auli, 2020, "wav2vec 2.0", NeurIPS; data2vec 2022), ``fairseq/data/data_utils.py:compute_mask_indices``
  with static span lengths, no padding and ``require_same_masks``.
* :func:`mask_to_indices`: boolean masks with equal counts per row to keep/masked index tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import ConfigError

__all__ = [
    "MaskSet",
    "random_masking",
    "block_masking",
    "multiblock_masking",
    "inverse_block_masking",
    "span_masking",
    "future_masking",
    "sequence_mask",
    "wav2vec_span_masking",
    "mask_to_indices",
    "visible_estimate",
]

Grid = int | tuple[int, int]

BEIT_ATTEMPTS = 10
"""Rectangles tried per placement round before a sample stops growing (BEiT ``_mask``)."""

IJEPA_TRIES = 20
"""Context placements tried per constraint level before one target is dropped from the
constraint (I-JEPA ``_sample_block_mask`` timeout)."""


@dataclass
class MaskSet:
    """One batch of random masks in every form the methods use (MAE conventions).

    keep:        (B, K) long, the visible patches, in shuffled order (the encoder's input order)
    masked:      (B, M) long, the masked patches, in shuffled order
    mask:        (B, N) bool, True = masked
    ids_restore: (B, N) long, the inverse of the shuffle: ``torch.gather`` of the
                 concatenation [encoded keep tokens, M mask tokens] with ``ids_restore``
                 puts every token back at its patch position (MAE decoder input).
    """

    keep: Tensor
    masked: Tensor
    mask: Tensor
    ids_restore: Tensor


# ----------------------------------------------------------------------------------------------
# helpers


def _grid(grid: Grid) -> tuple[int, int]:
    gh, gw = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if gh < 1 or gw < 1:
        raise ConfigError(f"patch grid must be positive, got {grid!r}")
    return gh, gw


def _device(device: torch.device | str | None, generator: torch.Generator | None) -> torch.device:
    """The device to build masks on: the one asked for, else the generator's, else CPU."""
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but masks are requested on {device}; "
            "create it with torch.Generator(device=...) on the same device"
        )
    return device


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _exact_count(mask: Tensor, count: Tensor | int, generator: torch.Generator | None) -> Tensor:
    """``mask`` (B, N) bool changed to have exactly ``count`` True per row.

    Rows with too many True lose a uniformly random subset of them, rows with too few gain a
    uniformly random subset of their False entries (fairseq ``require_same_masks`` trims and
    fills the same way, with ``torch.multinomial``). One sort for the whole batch: scores in
    [1, 2) for True entries and [0, 1) for False ones, so the ``count`` highest scores are
    the True entries first, in random order, then random False entries.
    """
    batch, n = mask.shape
    score = _rand((batch, n), generator, mask.device).add_(mask.to(torch.float32))
    order = torch.argsort(score, dim=1, descending=True)
    ranks = torch.arange(n, device=mask.device).expand(batch, n)
    count = torch.as_tensor(count, device=mask.device).reshape(-1, 1)
    return torch.zeros_like(mask).scatter_(1, order, ranks < count)


def _integral(mask: Tensor) -> Tensor:
    """2-D prefix sums of ``mask`` (..., H, W) bool, flattened: (..., (H+1)*(W+1)) int32, so
    that any rectangle's count is four gathers (see :func:`_rect_count`)."""
    *lead, h, w = mask.shape
    table = torch.zeros((*lead, h + 1, w + 1), dtype=torch.int32, device=mask.device)
    table[..., 1:, 1:] = mask.to(torch.int32).cumsum(-2).cumsum(-1)
    return table.flatten(-2)


def _rect_count(table: Tensor, width: int, top: Tensor, left: Tensor, h: Tensor | int,
                w: Tensor | int, base: Tensor | int = 0) -> Tensor:
    """Count of True inside rectangles [top, top+h) x [left, left+w) from an integral ``table``
    (B, (H+1)*(W+1)) of a grid ``width`` W wide; rectangle tensors are (B, A). ``base`` offsets
    the flat index, to read one of several tables lying end to end in ``table``."""
    stride = width + 1
    bottom, right = top + h, left + w

    def at(r: Tensor, c: Tensor) -> Tensor:
        return table.gather(1, base + r * stride + c)

    return at(bottom, right) - at(top, right) - at(bottom, left) + at(top, left)


def _rect_mask(top: Tensor, left: Tensor, h: Tensor | int, w: Tensor | int, gh: int,
               gw: int) -> Tensor:
    """Boolean rectangles (..., gh, gw) for corner/size tensors of any shape (...)."""
    rows = torch.arange(gh, device=top.device)
    cols = torch.arange(gw, device=top.device)
    top, left = top.unsqueeze(-1), left.unsqueeze(-1)
    h = h.unsqueeze(-1) if isinstance(h, Tensor) else h
    w = w.unsqueeze(-1) if isinstance(w, Tensor) else w
    in_rows = (rows >= top) & (rows < top + h)
    in_cols = (cols >= left) & (cols < left + w)
    return in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)


def _sorted_true_first(mask: Tensor) -> Tensor:
    """Column indices of each row of ``mask`` (B, N): the True ones ascending, then the False
    ones ascending."""
    n = mask.shape[1]
    index = torch.arange(n, device=mask.device)
    key = torch.where(mask, index, index + n)
    return torch.sort(key, dim=1).values.remainder_(n)


# ----------------------------------------------------------------------------------------------
# MAE


def random_masking(batch: int, num_patches: int, ratio: float, *,
                   device: torch.device | str | None = None,
                   generator: torch.Generator | None = None) -> MaskSet:
    """Per-sample uniformly random masking, MAE's ``random_masking`` (He et al., 2022, CVPR,
    "Masked Autoencoders Are Scalable Vision Learners", sec. 3).

    Each sample draws noise u ~ U(0, 1)^N; ``ids_shuffle = argsort(u)`` ranks the patches, the
    first K = int(N * (1 - ratio)) are kept and the other M = N - K masked; ``ids_restore =
    argsort(ids_shuffle)`` undoes the shuffle. Paper default: ratio 0.75 (49 of 196 patches
    visible at 224 px / patch 16). ``int`` truncation exactly as the official code.

    Returns a :class:`MaskSet`; ``keep`` and ``masked`` are in shuffle order, as in MAE.
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"mask ratio must be in [0, 1), got {ratio}")
    device = _device(device, generator)
    keep_count = int(num_patches * (1 - ratio))
    noise = _rand((batch, num_patches), generator, device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep, masked = ids_shuffle[:, :keep_count], ids_shuffle[:, keep_count:]
    mask = torch.zeros((batch, num_patches), dtype=torch.bool, device=device)
    mask.scatter_(1, masked, True)
    return MaskSet(keep=keep, masked=masked, mask=mask, ids_restore=ids_restore)


# ----------------------------------------------------------------------------------------------
# BEiT


def block_masking(batch: int, grid: Grid, num_masked: int | Tensor, *, min_patches: int = 16,
                  min_aspect: float = 0.3, max_aspect: float | None = None,
                  max_patches: int | None = None, attempts: int = BEIT_ATTEMPTS,
                  max_rounds: int | None = None, device: torch.device | str | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Blockwise masking of BEiT (Bao et al., 2022, ICLR, "BEiT: BERT Pre-Training of Image
    Transformers", Algorithm 1; official ``MaskingGenerator``), vectorized over the batch.

    Each sample grows its mask by rectangles until it holds ``num_masked`` patches. One round,
    with r = min(num_masked - masked so far, max_patches) patches still allowed:
    up to ``attempts`` (10) tries of

        area  s ~ U(min_patches, r),   aspect a = exp(U(log min_aspect, log max_aspect)),
        h = round(sqrt(s * a)),  w = round(sqrt(s / a)),   kept only if h < gh and w < gw,
        top ~ U{0..gh-h},  left ~ U{0..gw-w},

    the first rectangle whose new (not yet masked) patches number in (0, r] is added. A sample
    whose 10 tries all fail stops growing (as the official loop ``break``s). All tries of a round
    are drawn and checked at once against the same mask (prefix sums give every rectangle's
    overlap), which is what the sequential official loop does, since a failed try changes
    nothing. Rounds repeat until every sample is done or stopped (at most ``max_rounds``,
    default ``num_masked``, the most one sample can use).

    Departure: the official generator may stop short of ``num_masked``; here samples that stop
    short are topped up with uniformly random patches, so every sample has EXACTLY
    ``num_masked`` masked patches (equal lengths per row make index tensors possible).

    Defaults: BEiT masks 75 of 196 patches (~40%) at 224 px / patch 16, min_patches 16,
    min_aspect 0.3, max_aspect 1/0.3, max_patches = num_masked. iBOT/DINOv2 use the same
    generator with min_patches 4, max_patches 0.5 * N and a per-sample count: pass
    ``num_masked`` as a (B,) long tensor for that.

    Returns (B, N) bool, True = masked.
    """
    gh, gw = _grid(grid)
    n = gh * gw
    device = _device(device, generator)
    target = torch.as_tensor(num_masked, device=device).to(torch.long).expand(batch)
    if bool((target < 0).any()) or bool((target > n).any()):
        raise ConfigError(f"num_masked must be in [0, {n}], got {num_masked!r}")
    if min_aspect <= 0:
        raise ConfigError(f"min_aspect must be positive, got {min_aspect}")
    max_aspect = max_aspect or 1.0 / min_aspect
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    cap = target if max_patches is None else target.clamp(max=int(max_patches))
    rounds = int(target.max()) if max_rounds is None else max_rounds

    mask = torch.zeros((batch, gh, gw), dtype=torch.bool, device=device)
    count = torch.zeros(batch, dtype=torch.long, device=device)
    active = count < target
    for _ in range(rounds):
        if not bool(active.any()):
            break
        allowed = torch.minimum(target - count, cap).unsqueeze(1)  # (B, 1)
        u = _rand((4, batch, attempts), generator, device)
        area = min_patches + u[0] * (allowed - min_patches)
        aspect = torch.exp(log_lo + u[1] * (log_hi - log_lo))
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        fits = (h < gh) & (w < gw)
        h, w = h.clamp(max=gh - 1), w.clamp(max=gw - 1)  # harmless stand-ins for tries that do not fit
        top = torch.floor(u[2] * (gh - h + 1)).long().clamp_(max=gh - h)
        left = torch.floor(u[3] * (gw - w + 1)).long().clamp_(max=gw - w)
        new = h * w - _rect_count(_integral(mask), gw, top, left, h, w)
        ok = fits & (new > 0) & (new <= allowed)
        grew = active & ok.any(1)
        first = ok.to(torch.uint8).argmax(1, keepdim=True)  # the first successful try
        pick = [t.gather(1, first).squeeze(1) for t in (top, left, h, w, new)]
        mask |= _rect_mask(*pick[:4], gh, gw) & grew.view(-1, 1, 1)
        count += torch.where(grew, pick[4], 0)
        active = grew & (count < target)
    return _exact_count(mask.view(batch, n), target, generator)


# ----------------------------------------------------------------------------------------------
# I-JEPA


def _ijepa_block_size(u: float, scale: tuple[float, float], aspect: tuple[float, float],
                      gh: int, gw: int) -> tuple[int, int]:
    """I-JEPA ``_sample_block_size``: ONE uniform draw u sets both the scale and the aspect."""
    keep = int(gh * gw * (scale[0] + u * (scale[1] - scale[0])))
    ratio = aspect[0] + u * (aspect[1] - aspect[0])
    h = int(round(math.sqrt(keep * ratio)))
    w = int(round(math.sqrt(keep / ratio)))
    return min(max(h, 1), gh), min(max(w, 1), gw)


def multiblock_masking(batch: int, grid: Grid, *, n_targets: int = 4,
                       target_scale: tuple[float, float] = (0.15, 0.2),
                       target_aspect: tuple[float, float] = (0.75, 1.5),
                       context_scale: tuple[float, float] = (0.85, 1.0),
                       context_aspect: tuple[float, float] = (1.0, 1.0), min_keep: int = 10,
                       allow_overlap: bool = False, device: torch.device | str | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, list[Tensor]]:
    """I-JEPA multi-block masking (Assran et al., 2023, CVPR, "Self-Supervised Learning from
    Images with a Joint-Embedding Predictive Architecture", sec. 3; official ``MaskCollator``).

    Per batch, one target block size and one context block size are drawn
    (``_sample_block_size``: a single u ~ U(0, 1) gives scale s = s_lo + u (s_hi - s_lo) and
    aspect a = a_lo + u (a_hi - a_lo), then with k = int(N s): h = round(sqrt(k a)),
    w = round(sqrt(k / a))). Per sample, ``n_targets`` target rectangles of that size are
    placed uniformly and independently (they may overlap each other); the context rectangle
    is placed uniformly and the union of the targets is removed from it. A context placement
    must keep MORE than ``min_keep`` patches; after 20 failed placements the constraint drops
    the last remaining target, and so on (the official ``tries`` relaxation). All placements of
    all levels are drawn at once and the first valid one is taken; if none is valid (the block
    itself has <= min_keep patches, where the official loop would never end) the unconstrained
    last placement is used. Finally every index set is cut to the shortest in the batch,
    keeping the lowest patch indices (``cm[:min_keep]`` on ascending ``nonzero``); targets
    are full rectangles and all have h * w patches.

    Paper defaults (ViT-H/14 at 224 px: 16 x 16 grid): 4 targets, scale (0.15, 0.2), aspect
    (0.75, 1.5); 1 context block, scale (0.85, 1.0), aspect 1; min_keep 10; no overlap
    between context and targets (``allow_overlap=True`` keeps targets inside the context).

    Departures from the official code: positions are drawn from the full range
    {0..gh-h} x {0..gw-w} and block sides may equal the grid side (the official
    ``torch.randint(0, H - h)`` never reaches the last row or column; facebookresearch/ijepa
    PR #40); ``min_keep`` is not applied to target blocks (their size is fixed per batch, so
    the official loop would hang on small grids where h * w <= min_keep).

    Returns ``(context, targets)``: context (B, Kc) long, ascending patch indices of the
    context; targets a list of ``n_targets`` (B, Kt) long tensors, each one block's patch
    indices, ascending (row-major inside the rectangle).
    """
    gh, gw = _grid(grid)
    n = gh * gw
    device = _device(device, generator)
    if n_targets < 1:
        raise ConfigError(f"n_targets must be >= 1, got {n_targets}")
    u = _rand((2,), generator, device).tolist()
    th, tw = _ijepa_block_size(u[0], target_scale, target_aspect, gh, gw)
    ch, cw = _ijepa_block_size(u[1], context_scale, context_aspect, gh, gw)

    # targets: n_targets full rectangles per sample
    pos = _rand((2, batch, n_targets), generator, device)
    t_top = torch.floor(pos[0] * (gh - th + 1)).long().clamp_(max=gh - th)
    t_left = torch.floor(pos[1] * (gw - tw + 1)).long().clamp_(max=gw - tw)
    inside = (torch.arange(th, device=device).view(-1, 1) * gw
              + torch.arange(tw, device=device).view(1, -1)).flatten()
    target_idx = (t_top * gw + t_left).unsqueeze(-1) + inside  # (B, T, th*tw), ascending
    targets = list(target_idx.unbind(1))

    # context: level l removes targets 0 .. T-l-1 (the first T-l), IJEPA_TRIES placements per level
    levels = 1 if allow_overlap else n_targets + 1
    if allow_overlap:
        allowed = torch.ones((batch, 1, gh, gw), dtype=torch.bool, device=device)
    else:
        t_rect = _rect_mask(t_top, t_left, th, tw, gh, gw)  # (B, T, gh, gw)
        covered = t_rect.cumsum(1, dtype=torch.int32) > 0  # covered[:, j] = union of targets 0..j
        none = torch.zeros((batch, 1, gh, gw), dtype=torch.bool, device=device)
        allowed = ~torch.cat([covered.flip(1), none], 1)  # level l excludes targets 0..T-1-l
    tries = levels * IJEPA_TRIES
    pos = _rand((2, batch, tries), generator, device)
    c_top = torch.floor(pos[0] * (gh - ch + 1)).long().clamp_(max=gh - ch)
    c_left = torch.floor(pos[1] * (gw - cw + 1)).long().clamp_(max=gw - cw)
    level = torch.arange(tries, device=device) // IJEPA_TRIES  # (tries,)
    size = (gh + 1) * (gw + 1)
    table = _integral(allowed).view(batch, levels * size)
    kept = _rect_count(table, gw, c_top, c_left, ch, cw, base=level * size)  # try j reads level[j]'s table
    valid = kept > min_keep
    valid[:, -1] |= ~valid.any(1)  # nothing valid: fall back to the last (unconstrained) try
    first = valid.to(torch.uint8).argmax(1)
    rows = torch.arange(batch, device=device)
    context = _rect_mask(c_top[rows, first], c_left[rows, first], ch, cw, gh, gw)
    context &= allowed[rows, level[first]]
    context = context.view(batch, n)
    shortest = int(context.sum(1).min())
    return _sorted_true_first(context)[:, :shortest], targets


# ----------------------------------------------------------------------------------------------
# data2vec 2.0


def inverse_block_masking(batch: int, grid: Grid, mask_ratio: float = 0.8, *,
                          block_size: int = 3, mask_prob_adjust: float = 0.07,
                          device: torch.device | str | None = None,
                          generator: torch.Generator | None = None) -> Tensor:
    """Inverse block masking of data2vec 2.0 (Baevski et al., 2023, ICML, "Efficient
    Self-supervised Learning with Contextualized Target Representations for Vision, Speech and
    Language", sec. 2; fairseq ``compute_block_mask_2d(inverse_mask=True)``).

    Instead of masking blocks, blocks of patches are KEPT: with p = 1 - mask_ratio the visible
    fraction, each sample draws c = int(N (p + mask_prob_adjust) / block_size^2) block centres
    uniformly (with replacement) over the N patches; every centre keeps the block_size x
    block_size square around it (offsets -block_size//2 ..., clipped at the grid border, so
    border blocks are smaller). The kept set is then trimmed or filled with uniformly random
    patches to exactly N - round(N * mask_ratio) (``require_same_masks``), and everything else
    is masked. ``mask_prob_adjust`` over-draws centres so that overlaps rarely leave the kept
    set short.

    Defaults (data2vec 2.0 images, ``base_images_only_task.yaml``): mask_prob 0.8,
    mask_prob_adjust 0.07, mask_length (block_size) 3; at 14 x 14 that is 5 centres, 39 kept,
    157 masked per sample. The student sees ``clone_batch`` differently masked copies of each
    image: call this with ``batch * clone_batch``.

    Departure: fairseq keeps int(N p) patches, i.e. masks ceil(N * mask_ratio); here exactly
    round(N * mask_ratio) are masked, as our spec asks. The two agree whenever the fractional
    part of N * mask_ratio is at least 0.5 (157 of 196 at 14 x 14); at 8 x 8 this masks 51
    where fairseq masks 52.

    Returns (B, N) bool, True = masked.
    """
    gh, gw = _grid(grid)
    n = gh * gw
    device = _device(device, generator)
    if not 0.0 <= mask_ratio <= 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    keep_prob = 1.0 - mask_ratio
    centres = int(n * ((keep_prob + mask_prob_adjust) / block_size ** 2))
    kept = torch.zeros((batch, n), dtype=torch.bool, device=device)
    if centres > 0:
        c = torch.randint(0, n, (batch, centres), generator=generator, device=device)
        offsets = torch.arange(block_size, device=device) - block_size // 2
        rows = ((c // gw).unsqueeze(-1) + offsets).clamp_(0, gh - 1)  # (B, c, bs)
        cols = ((c % gw).unsqueeze(-1) + offsets).clamp_(0, gw - 1)
        index = (rows.unsqueeze(-1) * gw + cols.unsqueeze(-2)).flatten(1)
        kept.scatter_(1, index, True)
    kept = _exact_count(kept, n - round(n * mask_ratio), generator)
    return ~kept


# ----------------------------------------------------------------------------------------------
# 1-D sequences (time series)


def _masked_count(num_patches: int, ratio: float) -> int:
    """M = N - int(N (1 - ratio)): MAE's and PatchTST's count of masked patches."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"mask ratio must be in [0, 1), got {ratio}")
    return num_patches - int(num_patches * (1 - ratio))


def span_masking(batch: int, num_patches: int, ratio: float, span: int, *,
                 device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """(B, N) bool, True = masked: exactly M = N - int(N (1 - ratio)) patches per row, in
    k = ceil(M / span) contiguous spans of ``span`` patches (the last one shorter when span does not
    divide M) at random places: each row's K = N - M visible patches and k spans are laid out in a
    uniformly random order of the K + k items, so two spans drawn next to each other read as one
    longer span."""
    if span < 1:
        raise ConfigError(f"mask span must be >= 1 patch, got {span}")
    device = _device(device, generator)
    masked = _masked_count(num_patches, ratio)
    if masked == 0:
        return torch.zeros((batch, num_patches), dtype=torch.bool, device=device)
    spans = math.ceil(masked / span)
    visible = num_patches - masked
    slots = visible + spans
    # which of the K + k slots hold spans: the k smallest of uniform noise
    rank = torch.argsort(torch.argsort(_rand((batch, slots), generator, device), dim=1), dim=1)
    is_span = rank < spans
    span_no = torch.cumsum(is_span.long(), 1) - 1  # 0..k-1 in order along the row, on span slots
    last = masked - span * (spans - 1)
    length = torch.where(is_span, torch.where(span_no == spans - 1, last, span), 1)
    start = torch.cumsum(length, 1) - length
    delta = torch.zeros((batch, num_patches + 1), dtype=torch.long, device=device)
    ones = is_span.long()
    delta.scatter_add_(1, start, ones)
    delta.scatter_add_(1, (start + length).clamp_max(num_patches), -ones)
    return torch.cumsum(delta[:, :num_patches], 1) > 0


def future_masking(batch: int, num_patches: int, ratio: float, *,
                   device: torch.device | str | None = None) -> Tensor:
    """(B, N) bool: the last M = N - int(N (1 - ratio)) patches of every row masked (the visible
    past predicts the hidden future, a forecasting-shaped mask)."""
    masked = _masked_count(num_patches, ratio)
    mask = torch.zeros((batch, num_patches), dtype=torch.bool, device=device)
    mask[:, num_patches - masked:] = True
    return mask


def sequence_mask(kind: str, batch: int, num_patches: int, ratio: float, *, span: int = 3,
                  device: torch.device | str | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """(B, N) bool masks of a 1-D patch sequence: ``random`` (MAE / PatchTST), ``block`` (spans of
    ``span`` patches) or ``future``."""
    if kind == "random":
        return random_masking(batch, num_patches, ratio, device=device, generator=generator).mask
    if kind == "block":
        return span_masking(batch, num_patches, ratio, span, device=device, generator=generator)
    if kind == "future":
        return future_masking(batch, num_patches, ratio, device=device)
    raise ConfigError(f"mask kind {kind!r} is not one of random, block, future")


def check_sequence_mask(ratio: float, kind: str, span: int) -> None:
    """Refuse (ConfigError) a method config's ``mask_ratio`` outside (0, 1), a ``mask`` that is not a
    ``sequence_mask`` kind, or a ``mask_span`` below 1 (the 1-D patch methods' shared options)."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"method.mask_ratio={ratio}: must be in (0, 1)")
    if kind not in ("random", "block", "future"):
        raise ConfigError(f"method.mask={kind!r}: must be random, block or future")
    if span < 1:
        raise ConfigError(f"method.mask_span={span}: must be >= 1")


def sequence_mask_indices(mask: Tensor, num_masked: int) -> tuple[Tensor, Tensor]:
    """``(keep (B, N - M) long, masked (B, M) long)``, each ascending, of masks (B, N) that hold exactly
    ``num_masked`` = M True per row (``sequence_mask``'s: M = N - int(N (1 - ratio)) for every kind, see
    ``masked_count``). No host sync: the count is the caller's, not read from the mask."""
    order = _sorted_true_first(~mask)
    keep_count = mask.shape[1] - num_masked
    return order[:, :keep_count], order[:, keep_count:]


def masked_count(num_patches: int, ratio: float) -> int:
    """How many of ``num_patches`` a ``sequence_mask`` of ``ratio`` hides in every row: N - int(N (1 - ratio))."""
    return _masked_count(num_patches, ratio)


def wav2vec_span_masking(batch: int, length: int, prob: float, span: int, *,
                         device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
    """(B, T) bool, True = masked, as fairseq's ``compute_mask_indices`` (static spans, no padding):

    1. one span count for the batch, ``n = int(prob * T / span + u)``, u ~ U[0, 1), at least 1;
    2. per row, n distinct span starts drawn uniformly from ``[0, T - span)`` (when that range holds n
       starts or fewer, the span is shortened to ``T - n - 1`` first, as fairseq does); each start masks
       ``span`` steps; spans may overlap, so about ``1 - exp(-prob)`` of the steps end up masked
       (data2vec / wav2vec 2.0: prob 0.65 -> about 48%);
    3. ``require_same_masks``: every row keeps a random subset of its masked steps of the size of the
       least-masked row, so all rows mask the same number."""
    if span < 1 or length < 2:
        raise ConfigError(f"span masking needs span >= 1 and at least 2 steps, got span {span}, {length} steps")
    device = _device(device, generator)
    n = max(1, int(prob * length / span + float(_rand((1,), generator, device))))
    if length - span <= n:
        span = max(1, length - n - 1)
    starts_range = max(1, length - span)
    n = min(n, starts_range)
    starts = torch.argsort(_rand((batch, starts_range), generator, device), dim=1)[:, :n]  # distinct, uniform
    steps = (starts.unsqueeze(-1) + torch.arange(span, device=device)).reshape(batch, -1).clamp_max(length - 1)
    mask = torch.zeros((batch, length), dtype=torch.bool, device=device)
    mask.scatter_(1, steps, True)
    counts = mask.sum(1)
    fewest = counts.min()
    # keep `fewest` of each row's masked steps, picked at random: rank the masked steps by noise
    noise = torch.where(mask, _rand((batch, length), generator, device), torch.full_like(mask, 2.0, dtype=torch.float))
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return rank < fewest


def visible_estimate(stat: torch.Tensor, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, 1) per-patch statistic -> the mean of it over the visible patches of each patch's
    3x3 neighbourhood on the (gh, gw) grid (the input-wide visible mean where no neighbour is
    visible): how the report's reconstructions undo ``norm_pix_loss`` without reading the hidden
    patch itself."""
    b = stat.shape[0]
    vis = (~hidden).float().view(b, 1, *grid)
    val = stat.view(b, 1, *grid) * vis
    num = F.avg_pool2d(val, 3, stride=1, padding=1, count_include_pad=False)
    den = F.avg_pool2d(vis, 3, stride=1, padding=1, count_include_pad=False)
    image = val.sum(dim=(2, 3), keepdim=True) / vis.sum(dim=(2, 3), keepdim=True).clamp_min(1)
    est = torch.where(den > 0, num / den.clamp_min(1e-12), image.expand_as(num))
    return est.view(b, -1, 1)


# ----------------------------------------------------------------------------------------------
# conversions


def mask_to_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``mask`` (B, N) bool (True = masked) with the same number M of True in every row ->
    ``(keep (B, N-M) long, masked (B, M) long)``, each ascending. Raises ValueError when the
    rows' counts differ (index tensors need equal lengths)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, N), got shape {tuple(mask.shape)}")
    counts = mask.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError("mask_to_indices needs the same number of masked patches in every row; "
                         f"got counts from {int(counts.min())} to {int(counts.max())}")
    masked_count = int(counts[0]) if counts.numel() else 0
    order = _sorted_true_first(~mask)
    keep_count = mask.shape[1] - masked_count
    return order[:, :keep_count], order[:, keep_count:]
