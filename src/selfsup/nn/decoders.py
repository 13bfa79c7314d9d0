"""Masked-autoencoder decoders: MAE's (He et al. 2022) plain Transformer decoder and Audio-MAE's
(Huang et al. 2022) local-attention decoder. Each takes the encoder's output for the visible patches
(CLS first, in the shuffled order of the mask) and predicts every patch's values in raster order."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from selfsup.nn.positions import sincos_2d_pos_embed

__all__ = ["LocalDecoder", "MAEDecoder", "mae_init"]


def mae_init(module: nn.Module) -> None:
    """MAE's ``initialize_weights`` (``_init_weights``) on every submodule: xavier-uniform Linear weights
    with zero biases, LayerNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MAEDecoder(nn.Module):
    """The official decoder: Linear(enc -> dim), mask tokens, unshuffle, fixed 2-D sin-cos
    positions (zeros for CLS), ``depth`` timm Blocks, LayerNorm, Linear(dim -> patch_dim)."""

    def __init__(self, in_dim: int, patch_dim: int, grid: tuple[int, int], dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self.grid = tuple(grid)
        # fixed, so not a parameter and not in checkpoints; rebuilt for another input grid
        self.register_buffer("pos_embed", sincos_2d_pos_embed(dim, *self.grid, cls_token=True), persistent=False)
        nn.init.normal_(self.mask_token, std=0.02)
        mae_init(self)

    def restore(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, dim): the encoder output embedded to the decoder's width, a mask token appended for
        every hidden patch and the patches put back in raster order, CLS first (no positions yet)."""
        x = self.embed(latent)
        b, n, d = x.shape[0], ids_restore.shape[1], x.shape[2]
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(b, n + 1 - x.shape[1], d)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # unshuffle
        return torch.cat([x[:, :1], tokens], dim=1)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        """latent: (B, 1+K, in_dim) encoder output, CLS first, visible tokens in shuffled order;
        ids_restore: (B, N) with N = gh*gw. Returns (B, N, patch_dim) in image (raster) order."""
        x = self.restore(latent, ids_restore)
        d = x.shape[2]
        grid = tuple(grid or self.grid)
        pos = self.pos_embed if grid == self.grid else sincos_2d_pos_embed(d, *grid, cls_token=True, device=x.device)
        x = x + pos.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]


class LocalDecoder(MAEDecoder):
    """Audio-MAE's ``decoder_mode=1``: the MAE decoder's embedding, mask tokens and positions, then Swin
    blocks over the (time, frequency) patch grid in windows of ``window`` patches, the odd blocks shifted
    by ``shift`` patches (time, frequency). The blocks are the ones the official code patches into timm
    0.3.2 (``timm_patch/swin_transformer.py``), which are timm's Swin V2-CR blocks
    (``SwinTransformerV2CrBlock``): post-norm residual branches, scaled cosine attention with a learned
    temperature per head, relative positions through a small MLP of log-spaced coordinates."""

    def __init__(self, in_dim: int, patch_dim: int, grid: tuple[int, int], dim: int = 512, depth: int = 16,
                 num_heads: int = 16, mlp_ratio: float = 4.0, window: tuple[int, int] = (4, 4),
                 shift: tuple[int, int] = (2, 0)) -> None:
        from timm.models.swin_transformer_v2_cr import SwinTransformerV2CrBlock

        super().__init__(in_dim, patch_dim, grid, dim=dim, depth=0, num_heads=num_heads, mlp_ratio=mlp_ratio)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            SwinTransformerV2CrBlock(dim, num_heads, tuple(grid), tuple(window),
                                     shift_size=(0, 0) if i % 2 == 0 else tuple(shift), mlp_ratio=mlp_ratio,
                                     init_values=None, norm_layer=norm)
            for i in range(depth))
        mae_init(self.blocks)  # the official initialize_weights reaches every Linear and LayerNorm

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        grid = tuple(grid or self.grid)
        if grid != self.grid:
            raise ValueError(f"the local decoder was built for a {self.grid} patch grid, got {grid}: "
                             "train and evaluate on clips of one length")
        tokens = self.restore(latent, ids_restore)[:, 1:]  # the CLS token is dropped (official)
        b, n, d = tokens.shape
        tokens = tokens + self.pos_embed[:, 1:].to(tokens.dtype)
        h = tokens.reshape(b, *grid, d)
        for blk in self.blocks:
            h = blk(h)
        return self.pred(self.norm(h.reshape(b, n, d)))
