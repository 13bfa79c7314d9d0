"""PatchTST: a channel-independent patch transformer for multivariate series (Nie, Nguyen,
Sinthong, Kalagnanam 2023, "A Time Series is Worth 64 Words: Long-term Forecasting with
Transformers", ICLR).

Each channel of a series (B, C, T) is encoded on its own with shared weights (channel
independence, sec. 3.1): instance-normalized (RevIN without its affine part, Kim et al. 2022: each
window's channel minus its mean, over its std), cut into N = (T - P) / S + 1 patches of P steps
with stride S (the first steps that do not fill a patch are dropped, as the official
``create_patch``), each patch projected by one Linear (P -> D), plus a learned position table
(uniform in [-0.02, 0.02], the official ``pe='zeros', learn_pe=True``), then ``depth`` post-norm
transformer blocks whose norms are BatchNorm over the channel of D (the paper's choice over
LayerNorm, appendix A.1.4). Dropout follows the attention output projection and again on the
residual branch (drawn here as one dropout of the same distribution), and in the MLP, as the
official ``TSTEncoderLayer``.

Sizes (``backbone.name``): ``patchtst`` is the paper's self-supervised model: D = 128, 3 blocks,
16 heads, MLP 512 (ratio 4), ReLU (the self-supervised script's ``act='relu'``), no residual
attention; patch 12 with stride 12 (``backbone.patch_size``, ``backbone.patch_stride``), dropout
0.2 in the recipes. ``backbone.embed_dim`` / ``depth`` / ``num_heads`` override it.
``backbone.max_len`` is the longest input in time steps (the position table holds its patch
count; a run fixes it from ``data.seq_len``, or a set's series length). ``backbone.norm: pre``
gives pre-norm blocks instead (not the paper's).

Outputs: ``tokens(x)`` (B, C, N, D); ``forward(x)`` the pooled feature (B, C * D): each channel's
tokens averaged over its patches, the channels side by side (so a C-channel series gives C * D
features; ``out_dim`` is the per-channel D).

Example::

    enc = build_backbone(BackboneConfig(name="patchtst", max_len=512))
    x = torch.randn(4, 7, 512)                 # 4 windows of 7 channels
    enc.tokens(x).shape                        # (4, 7, 42, 128)
    enc(x).shape                               # (4, 896)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.backbones import Backbone
from selfsup.config import BackboneConfig
from selfsup.errors import ConfigError
from selfsup.nn.predictors import gather_tokens
from selfsup.registry import register_backbone

__all__ = ["PatchTST", "TSEncoder", "instance_norm", "patch_count"]

REVIN_EPS = 1e-5  # RevIN's eps, added to the variance


def instance_norm(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RevIN's normalization without its affine part: (normalized x, mean, std) of each series'
    channel over time; ``x`` (B, C, T), the statistics (B, C, 1). ``y * std + mean`` undoes it."""
    mean = x.mean(-1, keepdim=True)
    std = torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + REVIN_EPS)
    return (x - mean) / std, mean, std


def patch_count(length: int, patch: int, stride: int) -> int:
    """Patches of ``patch`` steps at ``stride`` in ``length`` steps (the official ``create_patch``)."""
    return (max(length, patch) - patch) // stride + 1


class _BatchNormTokens(nn.Module):
    """BatchNorm1d over the D channels of tokens (..., N, D): statistics over every token of the batch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class PatchBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, *, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.num_heads, self.pre_norm = num_heads, pre_norm
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # the official layer drops the attention output twice (the projection's dropout, then the
        # residual's); two independent dropouts of rate p are one of rate 1 - (1 - p)^2 in
        # distribution (keep with probability (1 - p)^2, scale by its inverse), which costs half
        self.drop_attn = nn.Dropout(1 - (1 - dropout) ** 2)
        self.norm_attn = _BatchNormTokens(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop_mlp = nn.Dropout(dropout)
        self.drop_ffn = nn.Dropout(dropout)
        self.norm_ffn = _BatchNormTokens(dim)

    def attention(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_norm:
            x = x + self.drop_attn(self.attention(self.norm_attn(x)))
            return x + self.drop_ffn(self.fc2(self.drop_mlp(F.relu(self.fc1(self.norm_ffn(x))))))
        x = self.norm_attn(x + self.drop_attn(self.attention(x)))
        return self.norm_ffn(x + self.drop_ffn(self.fc2(self.drop_mlp(F.relu(self.fc1(x))))))


class PatchModel(nn.Module):
    def __init__(self, patch: int, patches: int, dim: int, depth: int, num_heads: int, *, dropout: float,
                 pre_norm: bool) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(patch, dim)
        self.pos_embed = nn.Parameter(torch.empty(patches, dim).uniform_(-0.02, 0.02))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PatchBlock(dim, num_heads, dropout=dropout, pre_norm=pre_norm)
                                    for _ in range(depth))


class PatchTST(Backbone):
    """The PatchTST encoder (see the module docstring)."""

    def __init__(self, *, max_len: int = 512, patch_size: int = 12, patch_stride: int | None = None,
                 embed_dim: int = 128, depth: int = 3, num_heads: int = 16, dropout: float = 0.0,
                 norm: str = "post", in_chans: int | None = None) -> None:
        stride = patch_stride or patch_size
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if max_len < patch_size:
            raise ValueError(f"max_len {max_len} is shorter than one patch of {patch_size} steps")
        patches = patch_count(max_len, patch_size, stride)
        model = PatchModel(patch_size, patches, embed_dim, depth, num_heads, dropout=dropout, pre_norm=norm == "pre")
        super().__init__(model, embed_dim, "selfsup")
        self.max_len, self.patch_size, self.patch_stride, self.patches = max_len, patch_size, stride, patches
        self.embed_dim, self.depth, self.num_heads, self.norm_type = embed_dim, depth, num_heads, norm
        # the data's channel count: the encoder reads any number (one at a time), methods that model
        # channels jointly (ts_crossvar's decoder) size themselves by it
        self.in_chans = in_chans

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, T) -> (B, C, N, P): the last ``P + S (N - 1)`` steps cut into patches."""
        t = x.shape[-1]
        if t < self.patch_size:
            raise ValueError(f"a series of {t} steps is shorter than one patch ({self.patch_size} steps)")
        n = patch_count(t, self.patch_size, self.patch_stride)
        if n > self.patches:
            raise ValueError(f"a series of {t} steps makes {n} patches; the encoder has positions for "
                             f"{self.patches} ({self.max_len} steps, backbone.max_len)")
        span = self.patch_size + self.patch_stride * (n - 1)
        return x[..., t - span:].unfold(-1, self.patch_size, self.patch_stride)

    def encode_patches(self, patches: Tensor, keep: Tensor | None = None) -> Tensor:
        """Tokens (B, C, N, D) of patches (B, C, N, P) (already normalized). With ``keep`` (B, C, K) long
        patch indices, only those patches enter the blocks (token dropping, as a JEPA context encoder
        reads its visible patches), each with its own position: tokens (B, C, K, D)."""
        b, c, n, p = patches.shape
        m = self.model
        h = m.patch_embed(patches.reshape(b * c, n, p)) + m.pos_embed[:n].to(patches.dtype)
        if keep is not None:
            h = gather_tokens(h, keep.reshape(b * c, -1))
        h = m.drop(h)
        for block in m.blocks:
            h = block(h)
        return h.view(b, c, h.shape[1], -1)

    def tokens(self, x: Tensor) -> Tensor:
        """Tokens (B, C, N, D) of raw series (B, C, T): instance-normalized, patched, encoded."""
        return self.encode_patches(self.patchify(instance_norm(x)[0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.tokens(x).mean(2).flatten(1)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.tokens(x)

    def forecast_features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(each channel's patch tokens flattened (B, C, N * D), mean (B, C, 1), std (B, C, 1)): what
        PatchTST's prediction head reads, and the instance statistics that undo its normalization."""
        normed, mean, std = instance_norm(x)
        return self.encode_patches(self.patchify(normed)).flatten(2), mean, std

    def lr_layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: 0 the embeddings, i + 1 for block i."""
        name = name.removeprefix("model.")
        return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 0


@register_backbone("patchtst", modality="series")
def build_patchtst(cfg: BackboneConfig) -> PatchTST:
    dim, depth, heads = cfg.embed_dim or 128, cfg.depth or 3, cfg.num_heads or 16
    if dim % heads:
        raise ConfigError(f"backbone.embed_dim={dim} is not divisible by backbone.num_heads={heads}")
    patch = cfg.patch_size or 12
    max_len = cfg.max_len or 512
    if max_len < patch:
        raise ConfigError(f"backbone.max_len={max_len} (data.seq_len) is shorter than one patch "
                          f"(backbone.patch_size={patch})")
    return PatchTST(max_len=max_len, patch_size=patch, patch_stride=cfg.patch_stride, embed_dim=dim, depth=depth,
                    num_heads=heads, dropout=cfg.dropout, norm=cfg.norm or "post", in_chans=cfg.in_chans)


# --------------------------------------------------------------------------------------
# TS2Vec's dilated convolutional encoder


class _SamePadConv(nn.Module):
    """A dilated Conv1d whose output keeps the input's length (the official ``SamePadConv``)."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int) -> None:
        super().__init__()
        field = (kernel - 1) * dilation + 1
        self.conv = nn.Conv1d(cin, cout, kernel, padding=field // 2, dilation=dilation)
        self.remove = 1 if field % 2 == 0 else 0
        self.kernel, self.dilation = kernel, dilation

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel % 2 and self.dilation >= x.shape[-1]:
            # every tap but the centre reads the zero padding (|offset| >= T): the same output as a 1x1
            # conv with the centre weights, without convolving 2 x dilation padded steps (dilation
            # reaches 1,024 in the last blocks, series are often far shorter)
            c = self.kernel // 2
            return F.conv1d(x, self.conv.weight[..., c:c + 1], self.conv.bias)
        out = self.conv(x)
        return out[..., : out.shape[-1] - self.remove] if self.remove else out


class _ConvBlock(nn.Module):
    """GELU, dilated conv, GELU, dilated conv, plus the input (through a 1x1 conv where the width
    changes, and in the last block)."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int, final: bool) -> None:
        super().__init__()
        self.conv1 = _SamePadConv(cin, cout, kernel, dilation)
        self.conv2 = _SamePadConv(cout, cout, kernel, dilation)
        self.projector = nn.Conv1d(cin, cout, 1) if cin != cout or final else None

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.projector is None else self.projector(x)
        return self.conv2(F.gelu(self.conv1(F.gelu(x)))) + residual


class TSModel(nn.Module):
    def __init__(self, in_chans: int, hidden: int, out_dim: int, depth: int, kernel: int) -> None:
        super().__init__()
        self.input_fc = nn.Linear(in_chans, hidden)
        widths = [hidden] * depth + [out_dim]
        self.blocks = nn.Sequential(*(_ConvBlock(widths[i - 1] if i else hidden, w, kernel, 2 ** i, i == depth)
                                      for i, w in enumerate(widths)))
        self.repr_dropout = nn.Dropout(0.1)


class TSEncoder(Backbone):
    """TS2Vec's encoder (Yue et al. 2022, "TS2Vec: Towards Universal Representation of Time Series",
    AAAI, sec. 3.1; official ``models/encoder.py``): a Linear input projection of each timestamp's C
    values to ``hidden`` (64), timestamps masked to zero where ``mask`` is False (training draws the
    mask), then ``depth`` (10) residual blocks of two dilated convolutions (kernel 3, dilation 2^i,
    GELU before each) and a last block to ``out_dim`` (320), and dropout 0.1 on the output: one
    ``out_dim`` vector per timestamp (``timesteps``). ``forward`` max-pools them over the whole series
    (the official ``encoding_window='full_series'``), the instance representation its classification
    protocol reads. Channels are mixed by the input projection, so the encoder is built for
    ``in_chans`` channels (``backbone.in_chans``, fixed from the data)."""

    def __init__(self, *, in_chans: int, hidden: int = 64, out_dim: int = 320, depth: int = 10, kernel: int = 3) -> None:
        super().__init__(TSModel(in_chans, hidden, out_dim, depth, kernel), out_dim, "selfsup")
        self.in_chans, self.hidden, self.depth = in_chans, hidden, depth

    def timesteps(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, T, out_dim) of series (B, C, T); ``mask`` (B, T), False where a timestamp is hidden."""
        if x.shape[1] != self.in_chans:
            raise ValueError(f"the encoder was built for {self.in_chans} channels (backbone.in_chans), "
                             f"got series of {x.shape[1]}")
        h = self.model.input_fc(x.transpose(1, 2))
        if mask is not None:
            h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
        return self.model.repr_dropout(self.model.blocks(h.transpose(1, 2))).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.timesteps(x).amax(1)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.timesteps(x)

    def forecast_features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(the last timestamp's representation (B, out_dim), zeros, ones): TS2Vec forecasts all channels
        from the representation of the window's last step (its causal encoding with the window as
        context), without instance normalization."""
        b, c = x.shape[:2]
        zeros = x.new_zeros(b, c, 1)
        return self.timesteps(x)[:, -1], zeros, zeros + 1

    def lr_layer_id(self, name: str) -> int:
        name = name.removeprefix("model.")
        return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 0


@register_backbone("ts2vec", modality="series")
def build_ts2vec(cfg: BackboneConfig) -> TSEncoder:
    if cfg.in_chans is None:
        raise ConfigError("backbone ts2vec: backbone.in_chans is not set; a series run fixes it from the data "
                          "before building the encoder")
    return TSEncoder(in_chans=cfg.in_chans, hidden=cfg.width, out_dim=cfg.embed_dim or 320, depth=cfg.depth or 10)
