"""The jigsaw pretext (Noroozi & Favaro 2016): a fixed set of tile permutations with large
Hamming distances, and batched tiling / shuffling of an image batch on its device.

Permutation set (paper sec. 3, Algorithm 1). The classifier predicts the index of the
permutation that shuffled the tiles, so the set is fixed before training. Its members should be
far apart: the paper shows transfer improves with the average Hamming distance of the set
(table 3). Algorithm 1 is greedy: start from a random permutation; then repeatedly add the
candidate whose distances to the permutations chosen so far have the largest SUM
(``D̄ = 1ᵀD``, ``j = argmax_k D̄_k``), i.e. the largest average Hamming distance
(``criterion="mean"``). ``criterion="maxmin"`` instead adds the candidate whose NEAREST chosen
permutation is farthest (farthest-point sampling), breaking ties by the sum: it reaches the same
average (8.008 for 1000 of 9 tiles) with a larger minimum distance (5 instead of 2).

Cost: the paper scans all 9! = 362,880 candidates; with the position one-hot trick below that
takes ~4 s for 1000 permutations on one CPU core, so by default the candidates are a seeded
uniform sample of 100,000 distinct permutations (~1 s, same statistics as the full scan) and
``pool_size=0`` scans them all. Results are cached per process and are a pure function of the
arguments (numpy's PCG64 with ``seed``), so every rank and every resumed run builds the same set;
the jigsaw method also keeps it as a buffer in its checkpoints.

Pairwise Hamming distance of the sets, min / mean, seed 0 (``pool_size`` 100k and 0 agree):

    ====  ==================  ==================
    n     "mean" (Alg. 1)     "maxmin"
    ====  ==================  ==================
    100   2 / 8.08            6 / 8.08
    1000  2 / 8.008           5 / 8.008
    ====  ==================  ==================

The paper's table 3 reports an average of 8.00 and a minimum of 2 for its 1000-permutation set
(and 8.08 for 100); two random permutations of 9 differ in 8 positions on average.

Tiles (paper sec. 3): a square view is cut into a ``grid x grid`` array of ``cell``-pixel
cells and a ``tile``-pixel tile is taken at a random position inside each cell (225-px crop,
75-px cells, 64-px tiles in the paper), so neighbouring tiles share no edge to continue
(a shortcut the paper removes). Each colour channel of a tile can be moved by its own random
±``channel_jitter`` pixels (paper: ±2) against the chromatic-aberration shortcut. Every tile is
gathered with one advanced-indexing op over the whole batch; no Python loop over samples.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "hamming_permutations",
    "pairwise_hamming",
    "tile_positions",
    "extract_tiles",
    "shuffle_tiles",
    "unshuffle_tiles",
    "normalize_tiles",
    "assemble_tiles",
]

CRITERIA = ("mean", "maxmin")


# ---------------------------------------------------------------------------------------------
# permutation set


def _candidate_pool(n_items: int, pool_size: int, rng: np.random.Generator) -> np.ndarray:
    """(M, n_items) distinct permutations in lexicographic order: all of them when ``pool_size``
    is 0 or at least n_items!, else a seeded uniform sample of ``pool_size`` without repeats."""
    total = math.factorial(n_items)
    if pool_size <= 0 or pool_size >= total:
        if n_items > 10:
            raise ValueError(f"{n_items}! candidates cannot be enumerated; give a pool_size > 0")
        return np.array(list(itertools.permutations(range(n_items))), dtype=np.int64)
    if total < 2**63:
        ranks = np.sort(rng.choice(total, size=pool_size, replace=False))
        return _unrank(ranks, n_items)
    pool = np.argsort(rng.random((pool_size, n_items)), axis=1)  # 21+ items: repeats are negligible
    return np.unique(pool, axis=0)


def _unrank(ranks: np.ndarray, n_items: int) -> np.ndarray:
    """The permutations with lexicographic ranks ``ranks`` (factorial number system), vectorized:
    digit i of the rank picks which of the remaining items comes next."""
    m = len(ranks)
    remaining = np.tile(np.arange(n_items, dtype=np.int64), (m, 1))
    out = np.empty((m, n_items), dtype=np.int64)
    rows = np.arange(m)
    rest = ranks.astype(np.int64)
    for i in range(n_items):
        digit, rest = np.divmod(rest, math.factorial(n_items - 1 - i))
        out[:, i] = remaining[rows, digit]
        keep = np.ones(remaining.shape, dtype=bool)
        keep[rows, digit] = False
        remaining = remaining[keep].reshape(m, n_items - 1 - i)
    return out


@functools.lru_cache(maxsize=16)
def _hamming_permutations(n: int, n_items: int, pool_size: int, seed: int, criterion: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pool = _candidate_pool(n_items, pool_size, rng)
    m = len(pool)
    if n > m:
        raise ValueError(f"asked for {n} permutations from a pool of only {m}")
    # Position one-hot, transposed: onehot[i * n_items + v, k] = 1 iff candidate k puts v at i.
    # The number of positions where candidate k agrees with permutation p is then the sum of the
    # n_items rows (i * n_items + p[i]): contiguous row reads instead of an (M, n_items) compare.
    onehot = np.zeros((n_items * n_items, m), dtype=np.uint8)
    offsets = np.arange(n_items) * n_items
    onehot[offsets[None, :] + pool, np.arange(m)[:, None]] = 1
    total = np.zeros(m, dtype=np.int64)  # sum of distances to the chosen set (Algorithm 1's D̄)
    nearest = np.full(m, n_items, dtype=np.int64)  # distance to the nearest chosen permutation
    taken = np.zeros(m, dtype=bool)
    chosen = []
    j = int(rng.integers(m))  # Algorithm 1 starts from a uniformly random permutation
    for _ in range(n):
        chosen.append(j)
        taken[j] = True
        dist = n_items - onehot[offsets + pool[j]].sum(axis=0, dtype=np.int64)
        total += dist
        if criterion == "mean":
            score = total.copy()
        else:  # farthest point first; among equals the largest summed distance
            np.minimum(nearest, dist, out=nearest)
            score = nearest * (n * n_items + 1) + total
        score[taken] = -1
        j = int(score.argmax())  # ties: the first in the (random) pool order
    return pool[chosen]


def hamming_permutations(n: int, n_items: int = 9, pool_size: int = 100_000, seed: int = 0,
                         criterion: str = "mean") -> Tensor:
    """``n`` permutations of ``range(n_items)`` with large pairwise Hamming distances, as an int64
    tensor ``(n, n_items)``; greedy selection from a candidate pool (see the module docstring).

    Example:
        >>> perms = hamming_permutations(1000)          # the paper's 1000-class set for 3x3 tiles
        >>> d = pairwise_hamming(perms)
        >>> int(d[~torch.eye(1000, dtype=torch.bool)].min()), float(d.sum() / (1000 * 999))
        (2, 8.008...)
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if n < 1 or n_items < 2:
        raise ValueError(f"need n >= 1 permutations of n_items >= 2 items, got n={n}, n_items={n_items}")
    if n_items <= 20 and n > math.factorial(n_items):
        raise ValueError(f"only {math.factorial(n_items)} permutations of {n_items} items exist, asked for {n}")
    return torch.from_numpy(_hamming_permutations(n, n_items, pool_size, seed, criterion).copy())


def pairwise_hamming(perms: Tensor) -> Tensor:
    """(n, n) number of positions at which two permutations differ."""
    return (perms[:, None, :] != perms[None, :, :]).sum(-1)


# ---------------------------------------------------------------------------------------------
# tiles


def tile_positions(batch: int, size: int, grid: int, tile: int, channel_jitter: int = 0,
                   color: Tensor | None = None, channels: int = 3, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", centred: bool = False) -> tuple[Tensor, Tensor]:
    """Random top-left corners ``(top, left)``, each ``(batch, grid*grid, channels)`` int64, of the
    tiles of a ``size``-pixel square view, in row-major cell order.

    The ``grid * cell`` pixels used (``cell = size // grid``) are centred in the view; each tile
    lies at a uniform random offset in ``[0, cell - tile]`` inside its cell (the paper's gap), or
    at ``(cell - tile) // 2`` with ``centred`` (evaluation: no jitter), the
    same for all channels; then each channel moves by a uniform integer in
    ``[-channel_jitter, channel_jitter]`` per axis (only where ``color`` is True, if given: a
    grayscale image has no chromatic aberration to hide), clamped to stay inside the view.
    """
    cell = size // grid
    if not 1 <= tile <= cell:
        raise ValueError(f"tile side {tile} must be in [1, cell side {cell}] (view {size} px, grid {grid})")
    device = torch.device(device)
    n_tiles = grid * grid
    origin = (size - grid * cell) // 2
    idx = torch.arange(n_tiles, device=device)
    base_top = origin + (idx // grid) * cell
    base_left = origin + (idx % grid) * cell
    if centred:
        gap = torch.full((2, batch, n_tiles, 1), (cell - tile) // 2, dtype=torch.long, device=device)
    else:
        gap = torch.randint(0, cell - tile + 1, (2, batch, n_tiles, 1), generator=generator, device=device)
    top = (base_top[None, :, None] + gap[0]).expand(batch, n_tiles, channels)
    left = (base_left[None, :, None] + gap[1]).expand(batch, n_tiles, channels)
    if channel_jitter > 0:
        shift = torch.randint(-channel_jitter, channel_jitter + 1, (2, batch, n_tiles, channels),
                              generator=generator, device=device)
        if color is not None:
            shift = shift * color.to(device=device, dtype=shift.dtype).view(1, batch, 1, 1)
        top = (top + shift[0]).clamp(0, size - tile)
        left = (left + shift[1]).clamp(0, size - tile)
    return top.contiguous(), left.contiguous()


def extract_tiles(images: Tensor, top: Tensor, left: Tensor, tile: int) -> Tensor:
    """Gather ``(B, T, C, tile, tile)`` tiles from ``(B, C, H, W)`` images; tile ``t`` of sample
    ``b``, channel ``c`` is ``images[b, c, top:top+tile, left:left+tile]`` at ``[b, t, c]``."""
    batch, channels = images.shape[:2]
    offsets = torch.arange(tile, device=images.device)
    rows = (top[..., None] + offsets)[..., :, None]  # (B, T, C, tile, 1)
    cols = (left[..., None] + offsets)[..., None, :]  # (B, T, C, 1, tile)
    b = torch.arange(batch, device=images.device).view(batch, 1, 1, 1, 1)
    c = torch.arange(channels, device=images.device).view(1, 1, channels, 1, 1)
    return images[b, c, rows, cols]


def shuffle_tiles(tiles: Tensor, perms: Tensor) -> Tensor:
    """Put tile ``perms[b, i]`` of sample ``b`` at position ``i`` (``perms``: (B, T) int64)."""
    index = perms.view(*perms.shape, *([1] * (tiles.ndim - 2))).expand_as(tiles)
    return tiles.gather(1, index)


def unshuffle_tiles(shuffled: Tensor, perms: Tensor) -> Tensor:
    """Inverse of :func:`shuffle_tiles`: the tiles back in their cell order."""
    return shuffle_tiles(shuffled, perms.argsort(dim=1))


def normalize_tiles(tiles: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero mean and unit std per tile and channel (paper sec. 3: each tile is normalized
    independently so that low-level statistics shared by neighbours are not a shortcut). Per
    channel, so a grayscale tile stays gray whatever the view's per-channel mean/std."""
    flat = tiles.flatten(-2)
    mean = flat.mean(-1, keepdim=True)
    std = flat.std(-1, unbiased=False, keepdim=True)
    return ((flat - mean) / (std + eps)).view_as(tiles)


def assemble_tiles(tiles: Tensor, grid: int) -> Tensor:
    """``(B, grid*grid, C, t, t)`` tiles in row-major cell order -> ``(B, C, grid*t, grid*t)``
    images (for checks and visualisation)."""
    batch, _, channels, t, _ = tiles.shape
    x = tiles.view(batch, grid, grid, channels, t, t).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, channels, grid * t, grid * t)
