"""Projection and prediction heads, small standalone modules usable without the trainer."""

from __future__ import annotations

from torch import nn


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
