"""Fixed position embeddings shared by encoders and decoders (the ViTs, MAE's and Audio-MAE's decoders,
I-JEPA's predictor)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sincos_1d_pos_embed", "sincos_2d_pos_embed", "sincos_3d_pos_embed"]


def sincos_2d_pos_embed(dim: int, grid_h: int, grid_w: int, cls_token: bool = False, *,
                        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Fixed 2-D sine-cosine position embedding, as MAE's ``get_2d_sincos_pos_embed`` (after
    the Transformer's 1-D one and MoCo v3), for a ``grid_h x grid_w`` patch grid in row-major
    order: returns ``(1, N, dim)`` or, with ``cls_token``, ``(1, 1 + N, dim)`` with a zero row first.

    The first ``dim/2`` channels encode the column index ``w`` and the last ``dim/2`` the row index
    ``h`` (MAE builds the grid with ``meshgrid(grid_w, grid_h)``, "w goes first"); each half is
    the 1-D embedding of a position ``x`` with ``d = dim/2`` channels and ``\omega_k = 10000^{-2k/d}``,
    ``k = 0..d/2-1``:

    .. math:: [\sin(x\,\omega_0), \dots, \sin(x\,\omega_{d/2-1}), \cos(x\,\omega_0), \dots, \cos(x\,\omega_{d/2-1})]

    ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    h, w = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                          indexing="ij")

    def one_d(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega  # (N, dim/4)
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([one_d(w), one_d(h)], dim=1)  # (N, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb])
    return emb.unsqueeze(0).to(device=device, dtype=dtype)


def sincos_1d_pos_embed(dim: int, length: int, *, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Fixed 1-D sine-cosine position embedding of positions ``0 .. length - 1``, ``(1, length, dim)``:
    position ``x`` gets :math:`[\sin(x\,\omega_0), \dots, \sin(x\,\omega_{d/2-1}), \cos(x\,\omega_0), \dots,
    \cos(x\,\omega_{d/2-1})]` with :math:`\omega_k = 10000^{-2k/d}` (MAE's ``get_1d_sincos_pos_embed_from_grid``;
    TS-JEPA's encoder and predictor). ``dim`` must be even."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos position embedding needs an even dim, got {dim}")
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    out = torch.arange(length, dtype=torch.float64).reshape(-1, 1) * omega
    return torch.cat([out.sin(), out.cos()], dim=1).unsqueeze(0).to(device=device, dtype=dtype)


def sincos_3d_pos_embed(dim: int, grid_t: int, grid_h: int, grid_w: int, *, uniform_power: bool = True,
                        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Fixed 3-D sine-cosine position embedding of a (t, h, w) token grid flattened t-major
    (index = (t·H + h)·W + w), ``(1, T·H·W, dim)``: V-JEPA's ``get_3d_sincos_pos_embed``.

    The channels are the 1-D embeddings (``sincos_1d_pos_embed``'s formula) of the time, row and column
    index side by side, in that order. With ``uniform_power`` (V-JEPA's configs) each axis gets
    ``2·ceil(dim/6)`` channels and the concatenation is cut to ``dim``; without it time gets ``dim/2`` and
    rows and columns ``dim/4`` each. ``dim`` must be even (divisible by 4 without ``uniform_power``)."""
    if dim % 2 or (not uniform_power and dim % 4):
        raise ValueError(f"3-D sin-cos position embedding needs an even dim (divisible by 4 without uniform_power), "
                         f"got {dim}")
    if uniform_power:
        d_t = d_h = d_w = 2 * -(-dim // 6)
    else:
        d_t, d_h, d_w = dim // 2, dim // 4, dim // 4
    t, h, w = torch.meshgrid(torch.arange(grid_t, dtype=torch.float64), torch.arange(grid_h, dtype=torch.float64),
                             torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def one_d(d: int, pos: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([one_d(d_t, t), one_d(d_h, h), one_d(d_w, w)], dim=1)[:, :dim]
    return emb.unsqueeze(0).to(device=device, dtype=dtype)
