"""Optimizers: SGD, AdamW (torch) and LARS (You et al. 2017, as used by SimCLR and BYOL), and their
parameter groups (no weight decay on biases/norms, layer-wise lr decay for ViTs)."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.config import OptimConfig


class LARS(torch.optim.Optimizer):
    r"""Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017), SGD-momentum form used by
    SimCLR/BYOL: for each parameter tensor w with gradient g (weight decay folded in first,
    g <- g + wd w), the local rate is

    .. math:: \eta_{local} = \eta_{trust} \frac{\lVert w \rVert}{\lVert g \rVert}

    (1 when either norm is 0), the update is v <- m v + lr * eta_local * g; w <- w - v.
    With ``clip=True`` (NVIDIA apex's LARC "clip" mode, used by solo-learn's CIFAR recipes with
    eta 0.02) the multiplier is min(eta_local / lr, 1), so a layer's rate is min(eta_local, lr):
    never above the scheduled lr, however small its gradient.
    Parameter groups with ``lars_exclude=True`` (biases and norm layers, as in the papers) get
    neither weight decay nor adaptation.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, clip: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    if group["clip"] and group["lr"] > 0:
                        trust = torch.clamp(trust / group["lr"], max=1.0)
                    g = g * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, exclude_bias_norm: bool = True, layer_decay: float = 1.0,
                 bias_norm_lr_scale: float = 1.0) -> list[dict]:
    """Weights (decayed, adapted) and biases/norm parameters (1-d tensors), which the
    SimCLR/BYOL/MAE recipes exclude from weight decay and LARS adaptation. Parameters under a
    module named in the model's ``fixed_lr_modules`` (SimSiam's predictor, sec. 4.2) get their own
    groups marked ``fixed_lr``: the trainer holds their lr at the base value (times ``lr_scale``) at
    every step, without warmup or decay.

    Every group has an ``lr_scale`` the trainer multiplies its lr by:

    * layer-wise lr decay (Clark et al. 2020 ELECTRA; BEiT, MAE fine-tuning, DINOv2): a parameter
      of a submodule with an ``lr_layer_id(name)`` method and a ``depth`` (the ViT backbone) at
      layer ``i`` gets ``layer_decay ** (depth + 1 - i)`` (embeddings ``i = 0``, block ``j`` at
      ``j + 1``, final norm ``depth + 1`` -> 1); every other parameter (heads, predictors) 1;
    * the no-decay group (only when ``exclude_bias_norm``) is further scaled by
      ``bias_norm_lr_scale`` (Barlow Twins: biases and BN at 0.0048 / 0.2 of the weights' lr);
    * a parameter whose name starts with a key of the model's ``lr_multipliers`` dict is further
      scaled by its value (DINOv2: ``{"backbone.model.patch_embed.": 0.2}``).
    """
    fixed_prefixes = tuple(f"{m}." for m in getattr(model, "fixed_lr_modules", ()))
    lr_multipliers = dict(getattr(model, "lr_multipliers", {}))
    layered = [(f"{n}." if n else "", mod) for n, mod in model.named_modules()
               if callable(getattr(mod, "lr_layer_id", None)) and hasattr(mod, "depth")]
    layered.sort(key=lambda item: -len(item[0]))  # innermost first

    def layer_scale(name: str) -> float:
        if layer_decay == 1.0:
            return 1.0
        for prefix, mod in layered:
            if name.startswith(prefix):
                return layer_decay ** (mod.depth + 1 - mod.lr_layer_id(name[len(prefix):]))
        return 1.0

    buckets: dict[tuple[bool, bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = exclude_bias_norm and p.ndim <= 1
        scale = layer_scale(name) * (bias_norm_lr_scale if no_decay else 1.0)
        for prefix, mult in lr_multipliers.items():
            scale *= mult if name.startswith(prefix) else 1.0
        key = (bool(fixed_prefixes) and name.startswith(fixed_prefixes), no_decay, scale)
        buckets.setdefault(key, []).append(p)
    groups = []
    for (fixed, no_decay, scale), params in sorted(buckets.items()):
        groups.append({"params": params, "wd_scale": 0.0 if no_decay else 1.0, "lars_exclude": no_decay,
                       "fixed_lr": fixed, "lr_scale": scale})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over ``model``'s trainable parameters; each group has a
    ``wd_scale`` the trainer multiplies the scheduled weight decay by."""
    groups = param_groups(model, cfg.exclude_bias_norm, cfg.layer_decay, cfg.bias_norm_lr_scale)
    for g in groups:
        g["weight_decay"] = cfg.weight_decay * g["wd_scale"]
        g["lr"] = lr * g["lr_scale"]  # the trainer's schedule sets it again every step
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta,
                    clip=cfg.lars_clip)
    for g in groups:
        g.pop("lars_exclude")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
