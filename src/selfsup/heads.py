"""Projection and prediction heads, small standalone modules usable without the trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, *, bn_hidden: bool = True,
        bn_last: bool = False, bias_last: bool = True) -> nn.Sequential:
    """``num_layers`` linear layers; hidden layers are Linear -> BN -> ReLU (bias dropped where BN
    follows). ``bn_last`` adds an affine-free BN on the output (SimSiam/Barlow-style)."""
    if num_layers < 1:
        raise ValueError("an MLP head needs at least one layer")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not bn_hidden))
        if bn_hidden:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=bias_last and not bn_last))
    if bn_last:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class ProjectionHead(nn.Module):
    """SimCLR's g(.): h -> W2 relu(BN(W1 h)), the 2-layer MLP of Chen et al. 2020 (sec. 2.1),
    mapping encoder features to the space where the contrastive loss is applied."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2) -> None:
        super().__init__()
        self.net = mlp(in_dim, hidden_dim, out_dim, num_layers)

    def forward(self, x):
        return self.net(x)


class DINOHead(nn.Module):
    """MLP -> L2-normalize -> weight-normalized linear (Caron et al. 2021, appendix / official
    ``DINOHead``). ``num_layers`` counts the MLP's linear layers (3: in -> hidden -> hidden ->
    bottleneck); with ``norm_last_layer`` the last layer's weight norm g is fixed at 1, so its
    rows are unit vectors and the output is a vector of cosines."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(max(num_layers, 1) - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # (out_dim, 1) row norms
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
