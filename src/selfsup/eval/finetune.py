"""End-to-end fine-tuning: the whole pretrained backbone plus a new linear head, trained on a
labeled dataset (images or texts) and evaluated on a test split.

Three recipes, picked from the method's modality and backbone:

* **ViT (timm VisionTransformer)** - the MAE protocol (He, Chen, Xie, Li, Dollar, Girshick
  2022, "Masked Autoencoders Are Scalable Vision Learners", CVPR, Appendix A.1 / Table 9 and
  the official FINETUNE.md): AdamW (betas 0.9, 0.999), weight decay 0.05 (none on biases,
  norms, ``cls_token`` / ``pos_embed``), layer-wise lr decay (ELECTRA / BEiT: block ``i``
  gets ``decay ** (L - i)``, the embeddings ``decay ** (L + 1)``, the final norm and the head
  1), linear warm-up for 5 of 100 epochs then cosine, label smoothing 0.1, mixup 0.8, CutMix
  1.0, drop path 0.1, RandomResizedCrop + flip, head initialized N(0, 2e-5). MAE's ViT-B
  run: 100 epochs, batch 1024, base lr 5e-4 (lr = base x batch / 256), layer decay 0.65;
  ViT-L/H (and the paper's Table 9 defaults): 50 epochs, base lr 1e-3, layer decay 0.75,
  drop path 0.2 / 0.3. MAE also uses RandAugment (9, 0.5) and random erasing 0.25, which
  are not implemented here, and fine-tunes with global average pooling + ``fc_norm``; we
  keep the backbone's pooling as it was pretrained.
* **ResNet and other convnets** - the plain SGD recipe of SimCLR's fine-tuning (Chen et al.
  2020, Appendix B.5): SGD with Nesterov momentum 0.9, lr = 0.05 x batch / 256, no warm-up,
  no weight decay, random crop + flip only; cosine decay and label smoothing as above.
* **Text encoders** - BERT's GLUE fine-tuning (Devlin, Chang, Lee, Toutanova 2019, "BERT:
  Pre-training of Deep Bidirectional Transformers for Language Understanding", Sec. 4 and
  Appendix A.3): AdamW (betas 0.9, 0.999), weight decay 0.01 (none on biases and norms), linear
  warm-up over the first 10% of steps then linear decay to 0, dropout 0.1 in the encoder, batch
  32, no label smoothing, 3 epochs. BERT-base picks its lr from {5e-5, 3e-5, 2e-5}; the default
  here is 1e-4, the middle of the grid Turc et al. (2019, "Well-Read Students Learn Better")
  searched for the small BERTs (2-12 layers, 128-768 wide) that selfsup's text_tiny ... text_small
  resemble. The sentence feature is the one the encoder was pretrained to give (mean over the
  real tokens, or the first token with ``backbone.pool: cls``), run causally for causal LMs.

Augmentation runs batched on the device through :class:`selfsup.pretext.augment.Augment`
(random resized crop + flip, no colour), evaluation through ``method.preprocess`` (resize,
center crop, normalize). Mixup and CutMix are batched too: each sample is mixed with its
partner in the reversed batch, with its own lambda ~ Beta(alpha, alpha) and, when both are on,
its own coin for mixup vs CutMix (timm's "elem" mode; MAE uses one lambda per batch, which
changes only the variance of the regularizer). CutMix's lambda is corrected to the box area
actually pasted after clipping.

Example::

    from selfsup.evaluate import load_method, load_split
    from selfsup.eval.finetune import finetune
    method, cfg, _ = load_method("runs/mae-vit/last.ckpt", "cuda")
    res = finetune(method, load_split(cfg, "train"), load_split(cfg, "test"), epochs=100,
                   mixup=0.8, cutmix=1.0, drop_path=0.1, device="cuda")
    print(res["last_top1"])

Text runs read their labeled splits with ``load_feature_split`` (tokenized examples);
``selfsup eval finetune`` picks the reader and the recipe from the checkpoint's method.
"""

from __future__ import annotations

import copy
import sys
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from selfsup.errors import DataError

__all__ = ["finetune", "layer_decay_param_groups", "mix_batch", "vit_layer_id"]

# MAE (ViT-B, FINETUNE.md) and SimCLR (Appendix B.5) defaults
VIT_BASE_LR = 5e-4
VIT_LAYER_DECAY = 0.75
VIT_WEIGHT_DECAY = 0.05
VIT_WARMUP_FRACTION = 0.05  # 5 warm-up epochs of 100
SGD_BASE_LR = 0.05
TEXT_LR = 1e-4  # Turc et al. 2019's grid for small BERTs (BERT-base: 2e-5 ... 5e-5)
TEXT_WEIGHT_DECAY = 0.01
TEXT_WARMUP_FRACTION = 0.1
TEXT_DROPOUT = 0.1
TEXT_BATCH = 32
HEAD_INIT_STD = 2e-5

_EMBED_PREFIXES = ("cls_token", "pos_embed", "reg_token", "dist_token", "patch_embed", "norm_pre")


def _vit_of(backbone: nn.Module) -> nn.Module | None:
    """The timm VisionTransformer inside a selfsup Backbone (``backbone.model``), or None."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    model = getattr(backbone, "model", backbone)
    return model if isinstance(model, VisionTransformer) else None


def vit_layer_id(name: str, num_blocks: int) -> int:
    """Depth of a ViT parameter for layer-wise lr decay (BEiT / MAE): 0 for the patch and
    position embeddings and prefix tokens, ``i + 1`` for ``blocks.i``, ``num_blocks + 1`` for
    everything after the blocks (final norm, pooling, head)."""
    if name.startswith(_EMBED_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def layer_decay_param_groups(vit: nn.Module, *, weight_decay: float, layer_decay: float,
                             head: nn.Module | None = None, prefix: str = "") -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay for a timm ViT (plus an optional head).

    Each group has ``lr_scale = layer_decay ** (L + 1 - layer_id)`` (L = number of blocks, so
    the last block gets ``decay``, the embeddings ``decay ** (L + 1)``, the head 1) and
    ``weight_decay`` (0 for 1-d parameters and ``vit.no_weight_decay()`` names such as
    ``pos_embed`` / ``cls_token``). Groups also carry ``layer_id`` and parameter ``names``.
    """
    num_blocks = len(vit.blocks)
    skip = set(vit.no_weight_decay()) if hasattr(vit, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}

    def add(name: str, param: nn.Parameter, layer_id: int, decay: bool) -> None:
        group = groups.setdefault((layer_id, decay), {
            "params": [], "names": [], "layer_id": layer_id,
            "lr_scale": layer_decay ** (num_blocks + 1 - layer_id),
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(param)
        group["names"].append(name)

    for name, param in vit.named_parameters():
        if param.requires_grad:
            add(prefix + name, param, vit_layer_id(name, num_blocks), not (param.ndim <= 1 or name in skip))
    if head is not None:
        for name, param in head.named_parameters():
            if param.requires_grad:
                add(f"head.{name}", param, num_blocks + 1, param.ndim > 1)
    return sorted(groups.values(), key=lambda g: (g["layer_id"], -g["weight_decay"]))


def _plain_param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed) and biases / norm parameters (not decayed)."""
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "lr_scale": 1.0, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "lr_scale": 1.0, "weight_decay": 0.0})
    return groups


def _set_drop_path(vit: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last block), as timm."""
    from timm.layers import DropPath

    n = len(vit.blocks)
    for i, block in enumerate(vit.blocks):
        p = rate * i / max(1, n - 1)
        for attr in ("drop_path1", "drop_path2", "drop_path"):
            if hasattr(block, attr):
                setattr(block, attr, DropPath(p) if p > 0 else nn.Identity())


def mix_batch(x: Tensor, targets: Tensor, mixup: float = 0.0, cutmix: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-sample mixup / CutMix of a normalized image batch and its soft targets.

    Sample ``i`` is mixed with sample ``B - 1 - i`` (the reversed batch). Mixup:
    ``x = lam x_i + (1 - lam) x_j`` with ``lam ~ Beta(mixup, mixup)``. CutMix: a box of area
    ``(1 - lam) H W`` (``lam ~ Beta(cutmix, cutmix)``), centred uniformly and clipped to the
    image, is pasted from ``x_j``; ``lam`` becomes ``1 - box_area / (H W)``. With both on,
    each sample flips a fair coin between them. Targets mix with the same ``lam``.
    Random numbers come from the default generator on ``x.device``.
    """
    if mixup <= 0 and cutmix <= 0:
        return x, targets
    b, _, h, w = x.shape
    dev = x.device
    partner, partner_t = x.flip(0), targets.flip(0)
    if mixup > 0 and cutmix > 0:
        use_cut = torch.rand(b, device=dev) < 0.5
    else:
        use_cut = torch.full((b,), cutmix > 0, device=dev)
    lam = torch.ones(b, device=dev)
    if mixup > 0:
        a = torch.tensor(float(mixup), device=dev)
        lam = torch.where(use_cut, lam, torch.distributions.Beta(a, a).sample((b,)))
    out = lam.view(-1, 1, 1, 1) * x + (1 - lam).view(-1, 1, 1, 1) * partner
    if cutmix > 0:
        a = torch.tensor(float(cutmix), device=dev)
        lam_cut = torch.distributions.Beta(a, a).sample((b,))
        side = torch.sqrt(1 - lam_cut)
        cy, cx = torch.rand(b, device=dev) * h, torch.rand(b, device=dev) * w
        y1 = (cy - side * h / 2).clamp(0, h).round()
        y2 = (cy + side * h / 2).clamp(0, h).round()
        x1 = (cx - side * w / 2).clamp(0, w).round()
        x2 = (cx + side * w / 2).clamp(0, w).round()
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        inside = ((rows >= y1.view(-1, 1, 1)) & (rows < y2.view(-1, 1, 1))
                  & (cols >= x1.view(-1, 1, 1)) & (cols < x2.view(-1, 1, 1)))
        pasted = torch.where(inside.unsqueeze(1), partner, x)
        out = torch.where(use_cut.view(-1, 1, 1, 1), pasted, out)
        lam_cut = 1 - (y2 - y1) * (x2 - x1) / (h * w)
        lam = torch.where(use_cut, lam_cut, lam)
    lam = lam.view(-1, 1).to(targets.dtype)
    return out, lam * targets + (1 - lam) * partner_t


def _soft_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot targets with label smoothing: ``(1 - eps) onehot + eps / K``."""
    onehot = F.one_hot(labels, num_classes).float()
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def _is_text(method) -> bool:
    return "text" in getattr(method, "modalities", ())


def _set_dropout(module: nn.Module, rate: float) -> None:
    """Every dropout of a text encoder at ``rate`` (its ``nn.Dropout`` s and attention dropout)."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = rate
        elif hasattr(sub, "dropout") and isinstance(sub.dropout, float):
            sub.dropout = rate


def _linear_schedule(step: int, total_steps: int, base: float, warmup_steps: int) -> float:
    """BERT's: linear warm-up from 0 to ``base``, then linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    return base * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@torch.no_grad()
def _evaluate(forward, backbone: nn.Module, head: nn.Module, dataset, batch_size: int) -> tuple[float, float | None]:
    from selfsup.data import BatchLoader

    backbone.eval()
    head.eval()
    num_classes = head.out_features
    correct1 = correct5 = total = 0
    for batch in BatchLoader(dataset, batch_size, shuffle=False, drop_last=False):
        logits, y = forward(batch)
        top = logits.float().topk(min(5, num_classes), dim=1).indices
        hits = top == y[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += y.numel()
    return 100.0 * correct1 / total, (100.0 * correct5 / total if num_classes >= 5 else None)


def finetune(
    method,
    train_dataset,
    test_dataset,
    *,
    epochs: int = 100,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    layer_decay: float | None = None,
    label_smoothing: float | None = None,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    drop_path: float | None = None,
    dropout: float | None = None,
    warmup_epochs: float | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    min_lr: float = 0.0,
    eval_batch_size: int = 512,
    precision: str = "32",
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    num_classes: int | None = None,
    return_model: bool = False,
) -> dict[str, Any]:
    """Fine-tune a deep copy of the method's encoder plus a new linear head; ``method`` is untouched.

    Args:
        method: a trained Method (images: its backbone, ``eval_size`` / mean / std and
            ``preprocess``; texts: its encoder, run as ``method.encode`` runs it).
        train_dataset, test_dataset: labeled :class:`~selfsup.data.ImageArrayDataset` s, or
            labeled text examples (``load_feature_split`` of a text run).
        epochs, batch_size: training length (the last partial batch of an epoch is dropped;
            a batch larger than the training set is cut to its size); batch default 256
            (images) or 32 (texts, BERT).
        lr: peak learning rate; default ``base x batch / 256`` with base 5e-4 (AdamW, ViT; MAE
            ViT-B) or 0.05 (SGD, other backbones; SimCLR); 1e-4 for texts (AdamW).
        weight_decay: default 0.05 for ViTs (MAE), 0 for convnets (SimCLR), 0.01 for texts
            (BERT); never on 1-d params.
        layer_decay: layer-wise lr decay for ViTs (default 0.75, MAE's Table 9; MAE used 0.65
            for ViT-B); 1.0 turns it off. Other backbones reject it.
        label_smoothing: epsilon of the smoothed targets (default 0.1 for images, MAE; 0 for
            texts, BERT).
        mixup, cutmix: Beta alphas; 0 turns each off (MAE: 0.8 and 1.0). See :func:`mix_batch`.
            Images only.
        drop_path: stochastic depth of the ViT's last block (linear over depth); None keeps the
            backbone's own setting (MAE: 0.1 for ViT-B).
        dropout: every dropout of a text encoder during fine-tuning (default 0.1, BERT).
        warmup_epochs: linear warm-up; default 5% of ``epochs`` for ViTs (5 of MAE's 100), 10%
            for texts (BERT), 0 otherwise.
        crop_scale: RandomResizedCrop area range (0.08-1, torchvision's and MAE's default).
        min_lr: end of the cosine (MAE: 1e-6); texts decay linearly to 0 (BERT).
        precision: "32" or "bf16-mixed" (autocast; the head's loss is computed in fp32).
        device, seed: the seed fixes the head init, the data order and every augmentation draw;
            the caller's global RNG state is restored afterwards.
        progress: tqdm bar over epochs on a terminal.
        num_classes: default ``len(train_dataset.classes)``.
        return_model: also return the fine-tuned ``"backbone"`` and ``"head"`` modules.

    Honest reporting: ``best_top1`` is the best per-epoch *test* accuracy (selected on the
    test set, optimistic); ``last_top1`` is the number to quote.

    Returns:
        ``{"best_top1", "best_epoch" (1-based), "last_top1", "last_top5" (None under 5
        classes), "curve" (test top-1 per epoch), "train_loss" (per epoch), "lr" (peak),
        "recipe" (the resolved hyperparameters)}`` (+ ``"backbone"``, ``"head"``).
    """
    from selfsup.data import BatchLoader
    from selfsup.nn.schedules import cosine_schedule

    text = _is_text(method)
    for name, ds in (("train", train_dataset), ("test", test_dataset)):
        if not getattr(ds, "has_labels", False):
            raise DataError(f"fine-tuning needs a labeled {name} split (every sample with a class label)")
    batch_size = (TEXT_BATCH if text else 256) if batch_size is None else batch_size
    label_smoothing = (0.0 if text else 0.1) if label_smoothing is None else label_smoothing
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup} and {cutmix}")
    if precision not in ("32", "bf16-mixed"):
        raise ValueError(f"precision must be '32' or 'bf16-mixed', got {precision!r}")
    if text and (mixup > 0 or cutmix > 0 or drop_path is not None or layer_decay is not None):
        raise ValueError("mixup, cutmix, drop_path and layer_decay apply to images; a text encoder takes dropout")
    if not text and dropout is not None:
        raise ValueError("dropout applies to text encoders (images: drop_path for ViTs)")
    device = torch.device(device)
    num_classes = num_classes or len(train_dataset.classes)
    batch_size = min(batch_size, len(train_dataset))

    def autocast():
        if precision == "bf16-mixed":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        backbone = copy.deepcopy(method.encoder if text else method.backbone).to(device)
        backbone.requires_grad_(True)
        vit = None if text else _vit_of(backbone)
        if drop_path is not None:
            if vit is None:
                raise ValueError("drop_path applies to ViT backbones only")
            _set_drop_path(vit, drop_path)
        head = nn.Linear(backbone.out_dim, num_classes).to(device)
        nn.init.trunc_normal_(head.weight, std=HEAD_INIT_STD, a=-2 * HEAD_INIT_STD, b=2 * HEAD_INIT_STD)
        nn.init.zeros_(head.bias)

        if text:
            dropout = TEXT_DROPOUT if dropout is None else dropout
            _set_dropout(backbone, dropout)
            weight_decay = TEXT_WEIGHT_DECAY if weight_decay is None else weight_decay
            lr = TEXT_LR if lr is None else lr
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                _plain_param_groups([backbone, head], weight_decay), lr=lr, betas=(0.9, 0.999))
            warmup_epochs = TEXT_WARMUP_FRACTION * epochs if warmup_epochs is None else warmup_epochs
            opt_name = "adamw"
            causal = bool(getattr(method, "causal", False))

            def forward(batch: dict) -> tuple[Tensor, Tensor]:
                """Logits and labels of a labeled batch (training and test alike)."""
                tokens = batch["tokens"].to(device, non_blocking=True)
                mask = batch["attention_mask"].to(device, non_blocking=True)
                with autocast():
                    return head(backbone(tokens, mask, causal=causal)), batch["labels"].to(device)

            def train_forward(batch: dict) -> tuple[Tensor, Tensor]:
                logits, labels = forward(batch)
                return logits, _soft_targets(labels, num_classes, label_smoothing)
        else:
            from selfsup.pretext.augment import Augment, AugmentConfig

            if vit is not None:
                layer_decay = VIT_LAYER_DECAY if layer_decay is None else layer_decay
                weight_decay = VIT_WEIGHT_DECAY if weight_decay is None else weight_decay
                lr = lr if lr is not None else VIT_BASE_LR * batch_size / 256
                groups = layer_decay_param_groups(vit, weight_decay=weight_decay, layer_decay=layer_decay, head=head)
                optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
                warmup_epochs = VIT_WARMUP_FRACTION * epochs if warmup_epochs is None else warmup_epochs
                opt_name = "adamw"
            else:
                if layer_decay is not None:
                    raise ValueError("layer_decay applies to ViT backbones only (timm VisionTransformer)")
                weight_decay = 0.0 if weight_decay is None else weight_decay
                lr = lr if lr is not None else SGD_BASE_LR * batch_size / 256
                optimizer = torch.optim.SGD(_plain_param_groups([backbone, head], weight_decay), lr=lr,
                                            momentum=0.9, nesterov=True)
                warmup_epochs = 0.0 if warmup_epochs is None else warmup_epochs
                opt_name = "sgd-nesterov"
            augment = Augment(AugmentConfig(size=method.eval_size, crop_scale=tuple(crop_scale), jitter_p=0.0,
                                            grayscale_p=0.0, mean=tuple(method.eval_mean),
                                            std=tuple(method.eval_std))).to(device)

            def forward(batch: dict) -> tuple[Tensor, Tensor]:
                """Logits and labels of a test batch: resized, centre-cropped, normalized."""
                x = method.preprocess({"images": batch["images"].to(device, non_blocking=True)})
                with autocast():
                    return head(backbone(x)), batch["labels"].to(device)

            def train_forward(batch: dict) -> tuple[Tensor, Tensor]:
                """Logits and soft targets of a training batch: augmented, then mixed (mixup / CutMix)."""
                targets = _soft_targets(batch["labels"].to(device), num_classes, label_smoothing)
                x = method.layout(augment(batch["images"].to(device, non_blocking=True)))
                x, targets = mix_batch(x, targets, mixup, cutmix)
                with autocast():
                    return head(backbone(x)), targets

        loader = BatchLoader(train_dataset, batch_size, shuffle=True, seed=seed, drop_last=True)
        steps_per_epoch = len(loader)
        total_steps = epochs * steps_per_epoch
        warmup_steps = int(round(warmup_epochs * steps_per_epoch))

        curve: list[float] = []
        losses: list[float] = []
        top5: float | None = None
        step = 0
        bar = tqdm(range(epochs), desc="fine-tune", disable=not (progress and sys.stderr.isatty()), leave=False)
        for epoch in bar:
            backbone.train()
            head.train()
            loader.set_epoch(epoch)
            running, seen = 0.0, 0
            for batch in loader:
                if text:
                    now = _linear_schedule(step, total_steps, lr, warmup_steps)
                else:
                    now = cosine_schedule(step, total_steps, lr, min_lr, warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = now * group["lr_scale"]
                logits, targets = train_forward(batch)
                loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=1), dim=1).mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"fine-tuning loss became {float(loss)} at step {step}; lower lr "
                                             f"(now {lr:.3g}) or use precision='32'")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                running += float(loss.detach()) * len(targets)
                seen += len(targets)
            losses.append(running / max(1, seen))
            top1, top5 = _evaluate(forward, backbone, head, test_dataset, eval_batch_size)
            curve.append(top1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", top1=f"{top1:.2f}")

    best = int(np.argmax(curve))
    result: dict[str, Any] = {
        "best_top1": curve[best],
        "best_epoch": best + 1,
        "last_top1": curve[-1],
        "last_top5": top5,
        "curve": curve,
        "train_loss": losses,
        "lr": lr,
        "recipe": {"optimizer": opt_name, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                   "weight_decay": weight_decay, "layer_decay": layer_decay if vit is not None else None,
                   "warmup_steps": warmup_steps, "total_steps": total_steps, "label_smoothing": label_smoothing,
                   "schedule": "linear" if text else "cosine", "min_lr": 0.0 if text else min_lr,
                   "precision": precision},
    }
    if text:
        result["recipe"]["dropout"] = dropout
    else:
        result["recipe"].update(mixup=mixup, cutmix=cutmix, drop_path=drop_path, crop_scale=list(crop_scale))
    if return_model:
        result["backbone"], result["head"] = backbone.eval(), head.eval()
    return result
