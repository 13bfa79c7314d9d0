"""Vision Transformer for masked modeling and joint-embedding methods.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR. Built on timm's :class:`~timm.models.vision_transformer.VisionTransformer` (its
``Block``, patch embedding, CLS token, final norm), so the weights keep timm's names and an
exported encoder loads into ``timm.create_model("vit_base_patch16_224", num_classes=0)``
without renaming. On top of timm, :meth:`ViT.tokens` does what masked-image methods need:

* **token dropping** (MAE, I-JEPA context encoder, data2vec 2.0): ``keep`` indices pick the
  patches that go through the blocks, gathered with ``torch.gather`` after the position
  embedding was added, as MAE's ``random_masking``;
* **mask tokens** (BEiT, iBOT/DINOv2, SimMIM): patches with ``mask=True`` are replaced by a
  learned ``mask_token`` before the position embedding is added;
* **all layers' outputs** (data2vec targets = average of the top-K blocks);
* fixed **2-D sin-cos** (MAE, I-JEPA, MoCo v3) or **learned** position embeddings, at any input
  size that is a multiple of the patch (sin-cos recomputed for the new grid; learned ones
  resampled bicubically as timm does, also DINO's ``interpolate_pos_encoding``);
* switchable **gradient checkpointing** of the blocks.

Initialization follows MAE's official ``models_mae.py``: xavier-uniform linear weights (zero
biases), xavier-uniform patch-embedding weight on its ``(D, C*p*p)`` view, CLS and mask token
N(0, 0.02), LayerNorm 1/0, the sin-cos table frozen (``requires_grad=False``) with a zero CLS
position. A learned table gets timm's truncated-normal std 0.02.

Sizes (``backbone.name``): ``vit_tiny`` 192 wide, 12 blocks, 3 heads (DeiT-Ti); ``vit_small``
384/12/6; ``vit_base`` 768/12/12; ``vit_large`` 1024/24/16; all MLP ratio 4, qkv bias.
``backbone.depth`` / ``embed_dim`` / ``num_heads`` override a size, ``backbone.patch_size``
(default 16) and ``backbone.img_size`` (default: the first view's crop side) set the grid.

Example::

    vit = build_backbone(BackboneConfig(name="vit_tiny", patch_size=4, img_size=32))
    x = torch.randn(8, 3, 32, 32)
    feats = vit(x)                                  # (8, 192) CLS feature
    keep = torch.rand(8, 64).argsort(1)[:, :16]     # MAE: 25% visible patches
    visible = vit.tokens(x, keep=keep)              # (8, 1 + 16, 192)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from selfsup.backbones import Backbone
from selfsup.config import BackboneConfig
from selfsup.errors import ConfigError
from selfsup.nn.decoders import mae_init
from selfsup.nn.positions import sincos_2d_pos_embed
from selfsup.registry import register_backbone

__all__ = ["ViT", "VIT_SIZES", "sincos_2d_pos_embed"]

# name -> (embed_dim, depth, num_heads)
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


class ViT(Backbone):
    """A timm VisionTransformer (``self.model``, CLS token, no classifier) plus a ``mask_token``.

    ``img_size`` is a side or ``(height, width)`` (spectrograms: (frames, mel bins)); ``in_chans``
    the input channels (1 for a spectrogram).

    ``forward(x)`` is the pooled feature ``(B, D)``: the final-normed CLS token (``pool="cls"``)
    or the mean of the final-normed patch tokens (``pool="mean"``); timm's own forward of
    ``self.model`` gives the same (``global_pool`` "token" / "avg" with ``fc_norm=False``).
    """

    def __init__(self, *, img_size: int | tuple[int, int] = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, in_chans: int = 3, pos_embed: str = "sincos",
                 pool: str = "cls", drop_path: float = 0.0, grad_checkpointing: bool = False,
                 layer_scale: float | None = None) -> None:
        from timm.models.vision_transformer import VisionTransformer

        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        model = VisionTransformer(
            img_size=(height, width), patch_size=patch_size, in_chans=in_chans, num_classes=0,
            global_pool="token" if pool == "cls" else "avg", fc_norm=False, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, class_token=True,
            dynamic_img_size=True,  # timm's own forward also takes any size (report, multi-crop)
            drop_path_rate=drop_path, weight_init="skip",
            init_values=layer_scale,  # timm's LayerScale: a learned per-channel gain on each branch
        )
        super().__init__(model, embed_dim, "timm")
        self.pos_embed_type = pos_embed
        self.pool = pool
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_size, self.img_size, self.in_chans = patch_size, img_size, in_chans
        self.grid_size: tuple[int, int] = (height // patch_size, width // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.set_grad_checkpointing(grad_checkpointing)
        self._init_weights()

    # ---- initialization ----------------------------------------------------------------

    @torch.no_grad()
    def _init_weights(self) -> None:
        """MAE ``initialize_weights``: sin-cos table (frozen), xavier patch embedding on the
        flattened view, CLS / mask token N(0, .02), xavier-uniform Linear, LayerNorm 1 / 0."""
        m = self.model
        if self.pos_embed_type == "sincos":
            m.pos_embed.copy_(sincos_2d_pos_embed(self.embed_dim, *self.grid_size, cls_token=True))
            m.pos_embed.requires_grad_(False)
        else:
            nn.init.trunc_normal_(m.pos_embed, std=0.02)  # timm's init of a learned table
        w = m.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(m.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        mae_init(m)

    # ---- switches and helpers ----------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (``torch.utils.checkpoint``)
        instead of storing them: less memory, about one more forward of compute. Only in training
        with grad enabled; the flag is timm's, so ``self.model``'s own forward honours it too."""
        self.model.set_grad_checkpointing(enable)

    @property
    def grad_checkpointing(self) -> bool:
        return bool(self.model.grad_checkpointing)

    def lr_layer_id(self, name: str) -> int:
        """Layer index of a parameter (name inside this backbone, with or without the ``model.``
        prefix) for layer-wise lr decay (BEiT / MAE / DINOv2): 0 for the patch and position
        embeddings, CLS and mask token; ``i + 1`` for ``blocks.i``; ``depth + 1`` for the final norm."""
        name = name.removeprefix("model.")
        if name in ("cls_token", "pos_embed", "mask_token", "reg_token") or name.startswith(
                ("patch_embed.", "norm_pre.")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def grid_of(self, x: Tensor) -> tuple[int, int]:
        """The patch grid ``(gh, gw)`` of an image batch (sides must be multiples of the patch)."""
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
        return h // p, w // p

    def pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        """Position table ``(1, 1 + gh*gw, D)`` (CLS row first) for a patch grid: the stored one at
        the built grid; otherwise the sin-cos table recomputed for the new grid (while it is
        frozen), or the stored table resampled bicubically as timm does (learned or fine-tuned)."""
        pos = self.model.pos_embed
        if tuple(grid) == self.grid_size:
            return pos
        if self.pos_embed_type == "sincos" and not pos.requires_grad:
            return sincos_2d_pos_embed(self.embed_dim, *grid, cls_token=True, device=pos.device, dtype=pos.dtype)
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(self.grid_size), num_prefix_tokens=1)

    def patchify(self, imgs: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, N, p*p*C)`` in MAE's order: patches row-major over the grid, each
        patch flattened as (row in patch, column in patch, channel) (``'nchpwq->nhwpqc'``)."""
        b, c = imgs.shape[:2]
        gh, gw = self.grid_of(imgs)
        p = self.patch_size
        x = imgs.reshape(b, c, gh, p, gw, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(b, gh * gw, p * p * c)

    def unpatchify(self, x: Tensor, C: int | None = None, grid: tuple[int, int] | None = None) -> Tensor:  # noqa: N803
        """Inverse of :meth:`patchify`: ``(B, N, p*p*C) -> (B, C, gh*p, gw*p)``, C the input channels
        by default; ``grid`` defaults to the built grid when N matches it, else to a square grid."""
        C = self.in_chans if C is None else C  # noqa: N806
        b, n, _ = x.shape
        p = self.patch_size
        if grid is None:
            grid = self.grid_size if n == self.num_patches else (math.isqrt(n),) * 2
        gh, gw = grid
        if gh * gw != n:
            raise ValueError(f"{n} patches do not form a {gh}x{gw} grid")
        x = x.reshape(b, gh, gw, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(b, C, gh * p, gw * p)

    # ---- forward -----------------------------------------------------------------------

    def tokens(self, x: Tensor, keep: Tensor | None = None, mask: Tensor | None = None,
               return_layers: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Encode normalized images ``x`` (B, C, H, W) into tokens ``(B, 1 + K, D)``, CLS first,
        after the final norm.

        ``mask`` (B, N) bool: True patches are replaced by ``mask_token`` before the position
        embedding is added (BEiT / iBOT). ``keep`` (B, K) long patch indices: only those patches
        (after adding positions, in the order given) and the CLS token go through the blocks
        (MAE); without it K = N. ``return_layers=True`` also returns every block's output
        ``(B, 1 + K, D)`` before the final norm, as a list of ``depth`` tensors.
        """
        m = self.model
        grid = self.grid_of(x)
        t = m.patch_embed.norm(m.patch_embed.proj(x).flatten(2).transpose(1, 2))  # (B, N, D)
        if mask is not None:
            t = torch.where(mask.unsqueeze(-1), self.mask_token.to(t.dtype), t)
        pos = self.pos_embed_for(grid)
        t = t + pos[:, 1:]
        if keep is not None:
            t = torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        cls = m.cls_token + pos[:, :1]
        if mask is None and self.mask_token.requires_grad and torch.is_grad_enabled():
            # an exactly-zero gradient for the unused mask token: DDP (no find_unused_parameters)
            # expects a gradient for every trainable parameter in every step
            cls = cls + 0.0 * self.mask_token
        cls = cls.to(t.dtype).expand(t.shape[0], -1, -1)
        t = m.norm_pre(m.pos_drop(torch.cat([cls, t], dim=1)))
        layers: list[Tensor] = []
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in m.blocks:
            t = checkpoint(block, t, use_reentrant=False) if ckpt else block(t)
            if return_layers:
                layers.append(t)
        t = m.norm(t)
        return (t, layers) if return_layers else t

    def pool_tokens(self, t: Tensor) -> Tensor:
        """``(B, 1 + K, D)`` normed tokens -> ``(B, D)``: CLS, or the mean of the patch tokens."""
        return t[:, 0] if self.pool == "cls" else t[:, 1:].mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool_tokens(self.tokens(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """Per-token features ``(B, 1 + N, D)``, CLS first, after the final norm (timm's sense)."""
        return self.tokens(x)


def _build_vit(size: str, cfg: BackboneConfig) -> ViT:
    dim, depth, heads = VIT_SIZES[size]
    dim = cfg.embed_dim or dim
    heads = cfg.num_heads or heads
    patch = cfg.patch_size or 16
    img = cfg.img_size or 224
    if dim % heads:
        raise ConfigError(f"backbone: embed_dim {dim} is not divisible by num_heads {heads}")
    if cfg.pos_embed == "sincos" and dim % 4:
        raise ConfigError(f"backbone.pos_embed=sincos needs embed_dim divisible by 4, got {dim}")
    if img % patch:
        raise ConfigError(f"backbone.img_size {img} is not a multiple of backbone.patch_size {patch}")
    return ViT(img_size=img, patch_size=patch, embed_dim=dim, depth=cfg.depth or depth, num_heads=heads,
               pos_embed=cfg.pos_embed, pool=cfg.pool, drop_path=cfg.drop_path,
               grad_checkpointing=cfg.grad_checkpointing, layer_scale=cfg.layer_scale)


for _size in VIT_SIZES:
    register_backbone(_size, modality="image")(lambda cfg, _s=_size: _build_vit(_s, cfg))
