"""The JEPA predictor, shared by the joint-embedding predictive methods (I-JEPA on image patch grids,
TS-JEPA on series patches): a narrow transformer that reads the context encoder's tokens at their
positions and, from one learned mask token per hidden position, predicts the target encoder's tokens
there. Also the token gather and the official I-JEPA weight init the predictors use."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

__all__ = ["JEPAPredictor", "gather_tokens", "official_init_"]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, K) long -> (B, K, D): the tokens at ``idx`` of each sample."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@torch.no_grad()
def official_init_(module: nn.Module) -> None:
    """The official I-JEPA initialization (``VisionTransformer._init_weights`` then ``init_model``,
    which re-initializes every Linear after the per-block rescaling): Linear and patch-embedding
    weights trunc-normal(0.02) with zero biases, LayerNorm weight 1 and bias 0 (TS-JEPA's
    ``init_weights`` is the same on its Linear and LayerNorm layers; V-JEPA's ``init_video_model`` likewise, with
    its Conv3d tubelet embedding)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class JEPAPredictor(nn.Module):
    """I-JEPA's ``VisionTransformerPredictor`` (and TS-JEPA's ``Predictor``, the same design) with timm
    blocks: Linear(enc_dim -> pred_dim) on the context tokens plus the fixed positions of their
    patches; for each target block, one learned mask token plus the positions of the block's patches
    appended; ``depth`` pre-norm blocks (MLP ratio 4, qkv bias), LayerNorm, Linear(pred_dim -> enc_dim).

    ``pos_embed`` is the fixed position table (1, N, pred_dim) of the N patches (2-D sin-cos for an
    image grid, 1-D for a sequence); ``norm_eps`` the LayerNorms' eps (I-JEPA 1e-6, TS-JEPA torch's
    1e-5); ``mask_token_std`` the mask token's trunc-normal init (I-JEPA 0.02; 0: zeros, TS-JEPA, V-JEPA);
    ``num_mask_tokens`` learned mask tokens, ``forward(..., mask_index=i)`` using token i mod n (V-JEPA: one per
    mask config).

    ``forward(ctx, ctx_idx, targets)``: ctx (B, Kc, enc_dim) context-encoder tokens at patch
    indices ctx_idx (B, Kc); targets a list of M index tensors (B, Kt). Returns (M·B, Kt, enc_dim),
    block-major (rows m·B .. (m+1)·B - 1 predict block m), the official order."""

    def __init__(self, pos_embed: torch.Tensor, enc_dim: int, pred_dim: int = 384, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, drop_path: float = 0.0, *, norm_eps: float = 1e-6,
                 mask_token_std: float = 0.02, num_mask_tokens: int = 1) -> None:
        super().__init__()
        if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[-1] != pred_dim:
            raise ValueError(f"pos_embed must be (1, N, {pred_dim}), got {tuple(pos_embed.shape)}")
        self.embed = nn.Linear(enc_dim, pred_dim)
        # (n, 1, d): one learned mask token per mask config (V-JEPA: one for each of its 2 configs)
        self.mask_token = nn.Parameter(torch.zeros(num_mask_tokens, 1, pred_dim))
        # fixed positions, not trained and not saved
        self.register_buffer("pos_embed", pos_embed.detach().float().clone(), persistent=False)
        dpr = torch.linspace(0, drop_path, depth).tolist()
        norm = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList(Block(pred_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=p,
                                          norm_layer=norm) for p in dpr)
        self.norm = norm(pred_dim)
        self.proj = nn.Linear(pred_dim, enc_dim)
        official_init_(self)
        if mask_token_std > 0:
            nn.init.trunc_normal_(self.mask_token, std=mask_token_std)

    def forward(self, ctx: torch.Tensor, ctx_idx: torch.Tensor, targets: list[torch.Tensor],
                mask_index: int = 0) -> torch.Tensor:
        b, kc = ctx_idx.shape
        n_blocks = len(targets)
        pos = self.pos_embed.expand(b, -1, -1)
        x = self.embed(ctx) + gather_tokens(pos, ctx_idx)
        tgt_pos = torch.cat([gather_tokens(pos, t) for t in targets])  # (M·B, Kt, d_p)
        queries = self.mask_token[mask_index % self.mask_token.shape[0]] + tgt_pos
        x = torch.cat([x.repeat(n_blocks, 1, 1), queries.to(x.dtype)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x)[:, kc:])
