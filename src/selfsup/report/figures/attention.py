"""CLS-token attention of the last block, for timm VisionTransformer backbones."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.report.data import _Skip
from selfsup.report.figures._plot import _figure, _to_display


def _vit(method) -> nn.Module | None:
    """The timm VisionTransformer inside ``method.backbone`` (or None)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    backbone = getattr(method, "backbone", None)
    model = getattr(backbone, "model", backbone)
    return model if isinstance(model, VisionTransformer) else None


@torch.no_grad()
def cls_attention(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention of the CLS token to every patch in the last block, per head: ``(B, H, gh, gw)``.

    The last block's attention input (LayerNorm'd tokens) is captured with a forward pre-hook;
    q and k are recomputed from its ``qkv`` linear (timm's fused attention never materializes
    the attention matrix), then ``softmax(q k^T / sqrt(d))`` and the CLS row is kept.
    """
    attn = vit.blocks[-1].attn
    if getattr(vit, "cls_token", None) is None:
        raise _Skip("the ViT has no CLS token (global-pool model)")
    if not hasattr(attn, "qkv"):
        raise _Skip(f"the last block's attention ({type(attn).__name__}) has no qkv projection")
    captured: dict[str, torch.Tensor] = {}
    handle = attn.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0].detach()))
    try:
        vit(x)
    finally:
        handle.remove()
    tokens = captured["x"].float()
    b, n, _ = tokens.shape
    heads = attn.num_heads
    qkv = attn.qkv(tokens).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
    prefix = getattr(vit, "num_prefix_tokens", 1)
    cls_row = weights[:, :, 0, prefix:]
    gh, gw = vit.patch_embed.grid_size
    if cls_row.shape[-1] != gh * gw:
        raise _Skip(f"{cls_row.shape[-1]} patch tokens do not form the {gh}x{gw} patch grid")
    return cls_row.reshape(b, heads, gh, gw)


def fig_attention(metrics, summary, model):
    method, _ = model.method
    vit = _vit(method)
    if vit is None:
        raise _Skip("not a ViT backbone")
    images, titles = model.pictures()
    x = method.preprocess({"images": images.to(model.device)})
    maps = cls_attention(vit, x).mean(dim=1)  # mean over heads
    maps = torch.nn.functional.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = maps.flatten(1).min(1).values.view(-1, 1, 1)
    hi = maps.flatten(1).max(1).values.view(-1, 1, 1)
    maps = ((maps - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy()
    shown = _to_display(x, method.eval_mean, method.eval_std)
    n = len(shown)
    fig, axes = _figure(2 * n, cols=n, panel_w=1.7, panel_h=1.9)
    for i in range(n):
        top, bottom = axes[i], axes[n + i]
        top.imshow(shown[i], interpolation="nearest")
        top.set_title(titles[i], fontsize=8)
        bottom.imshow(shown[i], interpolation="nearest")
        bottom.imshow(maps[i], cmap="inferno", alpha=0.6, interpolation="bilinear")
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0].set_ylabel("image", fontsize=8)
    axes[n].set_ylabel("CLS attention", fontsize=8)
    fig.suptitle(f"last-block CLS attention (mean of {vit.blocks[-1].attn.num_heads} heads)")
    return fig
