"""Video encoders: a ViT on space-time tubelets (VideoMAE, Tong et al. 2022; V-JEPA, Bardes et al. 2024;
V-JEPA 2, Assran et al. 2025).

:class:`VideoViT` reads normalized clips ``(B, C, T, H, W)``:

1. **tubelet embedding**: a Conv3d with kernel = stride = ``(tubelet_size, patch_size, patch_size)`` (2 x 16 x
   16 in the papers) turns the clip into a ``(T/t, H/p, W/p)`` grid of tokens, numbered t-major
   (index = (t·H' + h)·W' + w), the order of V-JEPA's and VideoMAE's ``flatten(2)``;
2. **positions** (``pos_embed``): ``sincos``, V-JEPA's fixed 3-D sin-cos table (``nn.positions.sincos_3d_pos_embed``,
   uniform power: a third of the channels per axis); ``learned`` (a table initialized trunc-normal 0.02); or
   ``rope``, V-JEPA 2's 3-D rotary embedding inside every attention (:func:`rope_3d`, no additive table);
3. **token dropping**: ``tokens(x, keep=...)`` encodes only the tokens at ``keep`` (B, K) (VideoMAE's visible
   tubes, V-JEPA's context), each with its own position;
4. **attention** (``attention``): ``joint`` space-time attention over all tokens (VideoMAE, V-JEPA), or
   ``divided`` (TimeSformer's factorized attention, Bertasius et al. 2021): each block attends first along time
   (the tokens at one spatial position), then within each time slice, then the MLP. Divided attention needs
   whole grids, so it refuses ``keep``: the masked methods use joint attention.

Blocks are pre-norm (LayerNorm eps 1e-6, qkv bias, MLP ratio 4, GELU) with timm's parameter names
(``blocks.i.norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``); there is no CLS token (none
of the three papers has one) and the pooled feature is the mean of the final-normed tokens (VideoMAE's
fine-tuning ``use_mean_pooling``; V-JEPA evaluates with an attentive probe over the same tokens, see
``selfsup.eval.attentive``). Initialization: trunc-normal(0.02) Linear and Conv3d weights, zero biases,
LayerNorm 1 / 0: V-JEPA's final state (``app/vjepa/utils.init_video_model`` re-initializes every Linear after
the model's own per-block rescaling, which so leaves no trace).

Sizes (``backbone.name``): ``video_vit_tiny`` 192 wide x 12 blocks x 3 heads, ``video_vit_small`` 384/12/6,
``video_vit_base`` 768/12/12, ``video_vit_large`` 1024/24/16; ``backbone.depth`` / ``embed_dim`` / ``num_heads``
override a size; ``backbone.img_size`` (default 224), ``patch_size`` (16), ``num_frames`` (16, fixed from the
data's ``data.frames``), ``tubelet_size`` (2), ``pos_embed`` and ``attention`` as above.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from selfsup.backbones import Backbone
from selfsup.config import BackboneConfig
from selfsup.errors import ConfigError
from selfsup.nn.positions import sincos_3d_pos_embed
from selfsup.nn.predictors import official_init_
from selfsup.registry import register_backbone

__all__ = ["VIDEO_VIT_SIZES", "VideoViT", "grid_coords", "hf_export", "rope_3d"]

VIDEO_VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "video_vit_tiny": (192, 12, 3),
    "video_vit_small": (384, 12, 6),
    "video_vit_base": (768, 12, 12),
    "video_vit_large": (1024, 24, 16),
}
ATTENTION = ("joint", "divided")


def grid_coords(idx: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(…, K) t-major token indices of a (T, H, W) grid -> (…, K, 3) float (t, h, w) coordinates."""
    _, h, w = grid
    return torch.stack([idx // (h * w), (idx // w) % h, idx % w], dim=-1).float()


def _rope_axis(x: Tensor, pos: Tensor) -> Tensor:
    """V-JEPA 2's ``rotate_queries_or_keys`` on one axis: x (…, K, d) rotated by the angles pos (…, K)·ω,
    ω_k = 10000^{-k/(d/2)}, k < d/2. Channels are rotated in adjacent pairs (2i, 2i+1) -> (-x_{2i+1}, x_{2i})
    while the angle of channel j is that of frequency j mod d/2 (the official ``repeat``: the sines and
    cosines tiled, not interleaved), exactly as the official code."""
    d = x.shape[-1]
    omega = 1.0 / 10000 ** (torch.arange(d // 2, device=x.device, dtype=torch.float32) / (d / 2))
    freq = pos.unsqueeze(-1).float() * omega  # (…, K, d/2)
    sin, cos = freq.sin(), freq.cos()
    sin, cos = torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)  # (…, K, d), tiled
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def rope_3d(x: Tensor, coords: Tensor) -> Tensor:
    """V-JEPA 2's 3-D RoPE on queries or keys x (B, heads, K, head_dim) at token coordinates coords (B, K, 3):
    the first ``s = 2·floor(head_dim/3 / 2)`` channels rotate with the time index, the next s with the row, the
    next s with the column (:func:`_rope_axis` each); any channels left over are not rotated."""
    s = 2 * ((x.shape[-1] // 3) // 2)
    parts = [_rope_axis(x[..., i * s:(i + 1) * s], coords[:, None, :, i]) for i in range(3)]
    return torch.cat([*parts, x[..., 3 * s:]], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention (timm's names: ``qkv``, ``proj``), with 3-D RoPE when coordinates are given."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, coords: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if coords is not None:
            q, k = rope_3d(q, coords), rope_3d(k, coords)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: the residual branch dropped per sample with probability ``p`` in training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """A pre-norm transformer block; with ``divided`` (TimeSformer) a temporal attention over the tokens of each
    spatial position comes first (``temporal_norm``, ``temporal_attn``, ``temporal_fc``), then the spatial
    attention within each time slice."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, divided: bool,
                 layer_scale: float | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.divided = divided
        if divided:
            self.temporal_norm = nn.LayerNorm(dim, eps=1e-6)
            self.temporal_attn = Attention(dim, num_heads)
            self.temporal_fc = nn.Linear(dim, dim)
        self.ls1 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale else None
        self.ls2 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale else None

    def forward(self, x: Tensor, coords: Tensor | None = None, grid: tuple[int, int, int] | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        """``attn_mask`` (N, N) bool, True where attention is allowed (joint attention only: V-JEPA 2-AC's
        block-causal mask)."""
        if self.divided:
            b, n, d = x.shape
            t, s = grid[0], grid[1] * grid[2]
            xt = x.reshape(b, t, s, d).transpose(1, 2).reshape(b * s, t, d)  # each spatial position's time series
            ct = None if coords is None else coords.reshape(b, t, s, 3).transpose(1, 2).reshape(b * s, t, 3)
            xt = self.temporal_fc(self.temporal_attn(self.temporal_norm(xt), ct))
            x = x + self.drop_path(xt.view(b, s, t, d).transpose(1, 2).reshape(b, n, d))
            xs = x.reshape(b * t, s, d)
            cs = None if coords is None else coords.reshape(b * t, s, 3)
            y = self.attn(self.norm1(xs), cs).view(b, n, d)
        else:
            y = self.attn(self.norm1(x), coords, attn_mask)
        x = x + self.drop_path(y if self.ls1 is None else y * self.ls1)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.ls2 is None else y * self.ls2)


class VideoTransformer(nn.Module):
    """The weights of a :class:`VideoViT` (what ``selfsup export`` writes): ``patch_embed.proj`` (Conv3d),
    ``pos_embed`` (learned only; fixed tables are rebuilt, not stored), ``blocks``, ``norm``."""

    def __init__(self, in_chans: int, dim: int, depth: int, heads: int, mlp_ratio: float, tubelet: int, patch: int,
                 num_tokens: int, learned_pos: bool, drop_path: float, divided: bool,
                 layer_scale: float | None) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(in_chans, dim, kernel_size=(tubelet, patch, patch),
                                          stride=(tubelet, patch, patch))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim)) if learned_pos else None
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r, divided, layer_scale) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)


class VideoViT(Backbone):
    """A ViT on clips (B, C, T, H, W) of tubelet tokens (see the module docstring); ``forward`` -> (B, D) mean
    of the final-normed tokens, ``tokens`` -> (B, K, D)."""

    def __init__(self, *, img_size: int = 224, num_frames: int = 16, patch_size: int = 16, tubelet_size: int = 2,
                 in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, pos_embed: str = "sincos", attention: str = "joint",
                 drop_path: float = 0.0, grad_checkpointing: bool = False, layer_scale: float | None = None) -> None:
        if pos_embed not in ("sincos", "learned", "rope"):
            raise ConfigError(f"backbone.pos_embed={pos_embed!r}: video ViTs take sincos, learned or rope")
        if attention not in ATTENTION:
            raise ConfigError(f"backbone.attention={attention!r}: must be joint or divided")
        if img_size % patch_size or num_frames % tubelet_size:
            raise ConfigError(f"a {num_frames}-frame clip of {img_size} px does not split into {tubelet_size} x "
                              f"{patch_size} x {patch_size} tubelets; make data.frames a multiple of "
                              "backbone.tubelet_size and backbone.img_size one of backbone.patch_size")
        if embed_dim % num_heads:
            raise ConfigError(f"backbone: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if pos_embed == "rope" and embed_dim // num_heads < 6:
            raise ConfigError(f"backbone.pos_embed=rope needs at least 6 channels per head, got {embed_dim // num_heads}")
        self.grid_size = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = math.prod(self.grid_size)
        model = VideoTransformer(in_chans, embed_dim, depth, num_heads, mlp_ratio, tubelet_size, patch_size,
                                 self.num_patches, pos_embed == "learned", drop_path, attention == "divided",
                                 layer_scale)
        super().__init__(model, embed_dim, "selfsup")
        self.img_size, self.num_frames, self.patch_size, self.tubelet_size = img_size, num_frames, patch_size, tubelet_size
        self.in_chans, self.embed_dim, self.depth, self.num_heads = in_chans, embed_dim, depth, num_heads
        self.pos_embed_type, self.attention = pos_embed, attention
        self.grad_checkpointing = grad_checkpointing
        if pos_embed == "sincos":
            self.register_buffer("fixed_pos", sincos_3d_pos_embed(embed_dim, *self.grid_size), persistent=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        official_init_(self.model)
        if self.model.pos_embed is not None:
            nn.init.trunc_normal_(self.model.pos_embed, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def lr_layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: 0 for the embeddings, i + 1 for block i, depth + 1 after."""
        if name.startswith(("patch_embed", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def grid_of(self, x: Tensor) -> tuple[int, int, int]:
        """The token grid (T', H', W') of a clip batch (B, C, T, H, W)."""
        t, h, w = x.shape[-3:]
        if t % self.tubelet_size or h % self.patch_size or w % self.patch_size:
            raise ValueError(f"clip {t}x{h}x{w} is not a multiple of the {self.tubelet_size}x{self.patch_size}x"
                             f"{self.patch_size} tubelet")
        return t // self.tubelet_size, h // self.patch_size, w // self.patch_size

    def pos_embed_for(self, grid: tuple[int, int, int]) -> Tensor | None:
        """The additive position table (1, N, D) of a grid (None with RoPE)."""
        if self.pos_embed_type == "rope":
            return None
        if self.pos_embed_type == "sincos":
            if tuple(grid) == self.grid_size:
                return self.fixed_pos
            return sincos_3d_pos_embed(self.embed_dim, *grid, device=self.fixed_pos.device)
        pos = self.model.pos_embed
        if tuple(grid) == self.grid_size:
            return pos
        table = pos.reshape(1, *self.grid_size, -1).permute(0, 4, 1, 2, 3)
        table = F.interpolate(table, size=grid, mode="trilinear", align_corners=False)
        return table.permute(0, 2, 3, 4, 1).flatten(1, 3)

    def patchify(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, N, t·p·p·C): the pixels of each tubelet, tokens t-major, each flattened as
        (frame in tubelet, row, column, channel) (VideoMAE's ``b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)``)."""
        b, c = video.shape[:2]
        gt, gh, gw = self.grid_of(video)
        t, p = self.tubelet_size, self.patch_size
        x = video.reshape(b, c, gt, t, gh, p, gw, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, gt * gh * gw, t * p * p * c)

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int] | None = None) -> Tensor:
        """Inverse of :meth:`patchify`: (B, N, t·p·p·C) -> (B, C, T, H, W)."""
        gt, gh, gw = grid or self.grid_size
        t, p, c = self.tubelet_size, self.patch_size, self.in_chans
        b = x.shape[0]
        x = x.reshape(b, gt, gh, gw, t, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, gt * t, gh * p, gw * p)

    def embed_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """(B, N, D) tubelet embeddings with their positions added (RoPE: none), and the grid."""
        grid = self.grid_of(x)
        t = self.model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        pos = self.pos_embed_for(grid)
        return (t if pos is None else t + pos.to(t.dtype)), grid

    def tokens(self, x: Tensor, keep: Tensor | None = None, return_layers: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Encode clips x (B, C, T, H, W) into (B, K, D) final-normed tokens; ``keep`` (B, K) long token indices
        encodes only those tokens (in that order), else K = N. ``return_layers`` also returns every block's
        output before the final norm."""
        t, grid = self.embed_tokens(x)
        return self.run_blocks(t, grid, keep, return_layers)

    def run_blocks(self, t: Tensor, grid: tuple[int, int, int], keep: Tensor | None = None,
                   return_layers: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """The blocks and final norm on embedded tokens (B, N, D) of a grid, keeping the tokens at ``keep``."""
        if keep is not None:
            if self.attention == "divided":
                raise ConfigError("backbone.attention=divided needs whole clips; masked methods train with joint "
                                  "attention")
            t = torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        coords = None
        if self.pos_embed_type == "rope":
            idx = keep if keep is not None else torch.arange(t.shape[1], device=t.device).expand(t.shape[0], -1)
            coords = grid_coords(idx, grid)
        layers: list[Tensor] = []
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.blocks:
            if ckpt:
                t = checkpoint(block, t, coords, grid, use_reentrant=False)
            else:
                t = block(t, coords, grid)
            if return_layers:
                layers.append(t)
        t = self.model.norm(t)
        return (t, layers) if return_layers else t

    def pool_tokens(self, t: Tensor) -> Tensor:
        return t.mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool_tokens(self.tokens(x))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.tokens(x)


def hf_export(encoder: VideoViT) -> tuple[dict[str, Tensor], dict] | str:
    """The encoder under Hugging Face ``transformers``' ``VJEPA2Model`` names with its ``config.json``, or why it cannot
    be: V-JEPA 2's architecture is this one with ``pos_embed: rope``, joint attention, MLP ratio 4 and no LayerScale
    (tested: the same tokens to float precision). The qkv projection is split into query, key and value; the predictor
    is not exported (``transformers`` builds one at random: call the model with ``skip_predictor=True``)."""
    why = [what for what, bad in ((f"{encoder.pos_embed_type} positions", encoder.pos_embed_type != "rope"),
                                  ("divided attention", encoder.attention != "joint"),
                                  ("LayerScale", encoder.model.blocks[0].ls1 is not None),
                                  ("an MLP ratio other than 4", encoder.model.blocks[0].mlp.fc1.out_features != 4 * encoder.embed_dim))
           if bad]
    if why:
        return ("transformers' VJEPA2Model is V-JEPA 2's encoder (3-D RoPE, joint attention, MLP ratio 4); this one has "
                + ", ".join(why))
    tensors: dict[str, Tensor] = {}
    for key, value in encoder.model.state_dict().items():
        value = value.detach().float().contiguous()
        if key.startswith("patch_embed.proj."):
            tensors["encoder.embeddings.patch_embeddings.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("blocks."):
            index, rest = key.split(".", 2)[1:]
            if rest.startswith("attn.qkv."):
                for name, part in zip(("query", "key", "value"), value.chunk(3, 0)):
                    tensors[f"encoder.layer.{index}.attention.{name}.{rest.rsplit('.', 1)[1]}"] = part.contiguous()
            else:
                tensors[f"encoder.layer.{index}." + rest.replace("attn.proj", "attention.proj")] = value
        elif key.startswith("norm."):
            tensors["encoder.layernorm." + key[len("norm."):]] = value
    config = {"architectures": ["VJEPA2Model"], "model_type": "vjepa2", "patch_size": encoder.patch_size,
              "crop_size": encoder.img_size, "frames_per_clip": encoder.num_frames, "tubelet_size": encoder.tubelet_size,
              "hidden_size": encoder.embed_dim, "in_chans": encoder.in_chans, "num_attention_heads": encoder.num_heads,
              "num_hidden_layers": encoder.depth, "mlp_ratio": 4.0, "layer_norm_eps": 1e-6, "qkv_bias": True,
              "hidden_act": "gelu", "drop_path_rate": 0.0}
    return tensors, config


def _build(size: str, cfg: BackboneConfig) -> VideoViT:
    dim, depth, heads = VIDEO_VIT_SIZES[size]
    return VideoViT(img_size=cfg.img_size or 224, num_frames=cfg.num_frames or 16, patch_size=cfg.patch_size or 16,
                    tubelet_size=cfg.tubelet_size, embed_dim=cfg.embed_dim or dim, depth=cfg.depth or depth,
                    num_heads=cfg.num_heads or heads, pos_embed=cfg.pos_embed, attention=cfg.attention,
                    drop_path=cfg.drop_path, grad_checkpointing=cfg.grad_checkpointing, layer_scale=cfg.layer_scale)


for _size in VIDEO_VIT_SIZES:
    register_backbone(_size, modality="video")(lambda cfg, _s=_size: _build(_s, cfg))
