"""Multi-crop (Caron et al. 2020, SwAV sec. 3.2): a few full-resolution global crops plus many
small local crops of each image. The views themselves come from ``Method.make_views`` (global
views, then ``augment.n_local`` local views); this module runs an encoder over them efficiently.

Running the encoder once per view wastes launches and, for BatchNorm networks, normalizes each
view with its own small-batch statistics; running it over one concatenation is impossible when
the sizes differ. As the official SwAV/DINO ``MultiCropWrapper`` does, views of the same
resolution are concatenated and encoded in one forward pass, one pass per resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["allow_any_input_size", "forward_by_resolution", "multicrop_sizes"]


def forward_by_resolution(fn: Callable[[torch.Tensor], torch.Tensor],
                          views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Apply ``fn`` to every view, calling it exactly once per distinct input shape.

    Views with the same (C, H, W) are concatenated along the batch (in their original order),
    encoded together, and split back; the result lists one output per view, in the order of
    ``views``. Groups run in the order their first view appears (global crops first).

    Example:
        >>> views = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 4
        >>> feats = forward_by_resolution(backbone, views)  # 2 backbone calls, 6 outputs
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[1:]), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(views)
    for idx in groups.values():
        sizes = [views[i].shape[0] for i in idx]
        x = views[idx[0]] if len(idx) == 1 else torch.cat([views[i] for i in idx])
        for i, part in zip(idx, fn(x).split(sizes)):
            out[i] = part
    return out  # type: ignore[return-value]


def allow_any_input_size(backbone: nn.Module) -> bool:
    """Let a timm Vision Transformer take inputs of any size (local crops are smaller than the
    ``img_size`` it was built for), interpolating its position embeddings per input as DINO's
    ``interpolate_pos_encoding`` does. Equivalent to building it with ``dynamic_img_size=True``.
    Returns False (and changes nothing) for models without that machinery, e.g. ResNets, which
    take any size anyway."""
    model = getattr(backbone, "model", backbone)
    patch = getattr(model, "patch_embed", None)
    if not hasattr(model, "dynamic_img_size") or patch is None or not hasattr(patch, "strict_img_size"):
        return False
    if model.dynamic_img_size:
        return True
    from timm.layers import Format

    model.dynamic_img_size = True
    patch.strict_img_size = False
    patch.flatten = False
    patch.output_fmt = Format.NHWC
    return True


def multicrop_sizes(augment) -> set[int]:
    """The crop sides a multi-crop config makes: every global view's and the local crops'."""
    sizes = {v.size for v in augment.views}
    if augment.n_local and augment.local is not None:
        sizes.add(augment.local.size)
    return sizes
