"""Cross-variable prediction: hold out whole channels of a multivariate window and predict them from the
others (the design documents' cross-variable pretext; selfsup's method, with MAE's asymmetric
encoder-decoder, He et al. 2022, across channels instead of across patches).

A channel-independent encoder (PatchTST's) learns nothing about how channels relate unless something
makes it: here the encoder reads only the visible channels, and a small decoder that mixes channels must
recover the hidden ones from the visible channels' tokens. Per batch of windows x (B, C, T):

1. each channel is instance-normalized (RevIN without affine) and cut into N patches of P steps;
2. per window, K = max(1, round(r C)) of the C channels are hidden, drawn uniformly (r =
   ``method.hidden_ratio``, 0.25: 2 of ETTh1's 7);
3. the encoder f_θ reads the C - K visible channels, one at a time with shared weights:
   tokens (B, C - K, N, D);
4. the decoder: Linear(D -> D_d) on every visible token, plus a learned embedding of its channel and
   fixed 1-D sin-cos positions of its patch; for every hidden (channel, patch) one learned mask token
   plus the same channel embedding and position; ``decoder_depth`` pre-norm blocks attend over all
   C · N tokens of the window (channels and time together), LayerNorm, Linear(D_d -> P) on the hidden
   tokens: x̂, each hidden channel's normalized patches;
5. loss: L = (1 / (B K N P)) Σ (x̂ - x)² over the hidden channels' normalized values.

Defaults: r = 0.25, decoder 128 wide, 2 blocks, 4 heads, MLP ratio 4. Needs at least two channels
(``backbone.in_chans``, fixed from the data; the channel embeddings are per channel index, so the
channel order is part of the model). ``encode`` is the encoder's pooled feature of all channels, as for
every PatchTST-encoder method; the collapse monitor watches the visible channels' mean tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from selfsup.backbones.series import instance_norm
from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.modalities.series import SeriesMethod
from selfsup.nn.positions import sincos_1d_pos_embed
from selfsup.nn.predictors import official_init_
from selfsup.registry import register_method


@dataclass
class TSCrossVarConfig(MethodConfig):
    name: str = "ts_crossvar"
    hidden_ratio: float = 0.25  # fraction of each window's channels held out (at least one)
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4

    def validate(self) -> None:
        if not 0.0 < self.hidden_ratio < 1.0:
            raise ConfigError(f"method.hidden_ratio={self.hidden_ratio}: must be in (0, 1)")
        if min(self.decoder_dim, self.decoder_depth, self.decoder_heads) < 1 or self.decoder_dim % self.decoder_heads \
                or self.decoder_dim % 2:
            raise ConfigError(f"method.decoder_dim={self.decoder_dim}, decoder_heads={self.decoder_heads}, "
                              f"decoder_depth={self.decoder_depth}: need >= 1 each, an even width divisible by the heads")


def hidden_channels(batch: int, channels: int, ratio: float, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible (B, C - K), hidden (B, K)) channel indices, each ascending: K = max(1, round(ratio C)) of the
    C channels of every window, uniformly at random (the K smallest of uniform noise)."""
    k = max(1, round(ratio * channels))
    if k >= channels:
        raise ConfigError(f"hiding {k} of {channels} channels leaves none to predict them from")
    order = torch.argsort(torch.rand(batch, channels, device=device), dim=1)
    return order[:, k:].sort(1).values, order[:, :k].sort(1).values


class CrossChannelDecoder(nn.Module):
    """Mask tokens for the hidden channels' patches, attention over every channel and patch of a window."""

    def __init__(self, enc_dim: int, channels: int, patches: int, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.channel_embed = nn.Parameter(torch.zeros(channels, dim))
        self.register_buffer("pos_embed", sincos_1d_pos_embed(dim, patches)[0], persistent=False)  # (N, dim)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(dim)
        self.head = nn.Linear(dim, patch)
        official_init_(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.channel_embed, std=0.02)

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """tokens (B, Cv, N, D) of channels ``visible`` (B, Cv) -> patches (B, K, N, P) of channels ``hidden``."""
        b, cv, n, _ = tokens.shape
        k = hidden.shape[1]
        pos = self.pos_embed[:n]
        seen = self.embed(tokens) + self.channel_embed[visible].unsqueeze(2) + pos
        asked = (self.mask_token + self.channel_embed[hidden].unsqueeze(2) + pos).to(seen.dtype)
        x = torch.cat([seen, asked], 1).flatten(1, 2)  # (B, (Cv + K) N, dim): channels and time together
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, cv * n:])).view(b, k, n, -1)


@register_method
class TSCrossVar(SeriesMethod):
    name = "ts_crossvar"
    paper = "Cross-variable prediction: held-out channels from the others (selfsup; MAE-style decoder)"
    family = "masked"
    Config = TSCrossVarConfig

    def __init__(self, cfg: TSCrossVarConfig, backbone: nn.Module, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        self.require_patch_encoder()
        channels = backbone.in_chans
        if channels is None or channels < 2:
            raise ConfigError(f"ts_crossvar predicts held-out channels from the others and needs series of at least 2 "
                              f"channels; the data has {channels} (backbone.in_chans)")
        self.channels = channels
        self.decoder = CrossChannelDecoder(backbone.embed_dim, channels, backbone.patches, backbone.patch_size,
                                           cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> StepOutput:
        x = self.preprocess(batch)
        b, c, _ = x.shape
        if c != self.channels:
            raise ConfigError(f"ts_crossvar was built for {self.channels} channels (backbone.in_chans), got series of {c}")
        patches = self.backbone.patchify(instance_norm(x)[0])  # (B, C, N, P)
        visible, hidden = hidden_channels(b, c, self.cfg.hidden_ratio, device=x.device)
        pick = lambda idx: patches.gather(1, idx[:, :, None, None].expand(-1, -1, *patches.shape[2:]))  # noqa: E731
        tokens = self.backbone.encode_patches(pick(visible))  # (B, C - K, N, D)
        pred = self.decoder(tokens, visible, hidden)
        loss = F.mse_loss(pred.float(), pick(hidden).float())
        return StepOutput(loss, {}, embeddings=tokens.detach().mean(2).flatten(0, 1))
