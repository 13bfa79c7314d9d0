"""Attentive probing of frozen tokens: V-JEPA's evaluation protocol (Bardes et al. 2024, sec. 4 and appendix;
official ``src/models/attentive_pooler.py``).

A frozen encoder's tokens (B, N, D) are pooled by a learned cross-attention and classified linearly:

1. one learned query token q (trunc-normal 0.02) attends to the LayerNorm-ed tokens,
   q <- q + softmax(W_q q (W_k LN(x))ᵀ / sqrt(d_h)) W_v LN(x) per head, then q <- q + MLP(LN(q)) (MLP ratio 4,
   GELU): the official ``CrossAttentionBlock`` (``AttentivePooler`` with one query and depth 1), whose
   ``CrossAttention`` defines an output projection but never applies it; ours has none;
2. a Linear layer maps the pooled q to the class logits (``AttentiveClassifier``).

Pooling with attention instead of averaging lets the probe read features that sit in a few tokens (where the
object is, when it moves), which is why V-JEPA, whose tokens are not trained to be averaged, is evaluated this
way. Only the pooler and the classifier train: AdamW, weight decay 0.01, lr warmed up linearly over the first
epoch then cosine-decayed to 0, cross-entropy; the lr is chosen among ``LRS`` on a held-out tenth of the
training tokens (the probe's optimum moves with the token scale: one fixed rate under-trains some encoders). The paper's recipe (``configs/evals/vitl16_k400_16x8x3.yaml``)
trains 20 epochs at batch 4 x 8 GPUs with lr 0.001 and re-augments every epoch (several clips and views per
video); here the tokens are computed once, on the evaluation view, and cached, so the probe costs seconds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentiveClassifier", "LRS", "attentive_probe"]

LRS = (3e-4, 1e-3, 3e-3)
"""Learning rates the probe chooses among on held-out training tokens (V-JEPA 2's sweep spans 1e-4 to 5e-3)."""


class AttentiveClassifier(nn.Module):
    """One learned query cross-attending to the tokens (V-JEPA's ``AttentivePooler``, depth 1), then Linear."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 16, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        heads = math.gcd(dim, num_heads)  # the official 16 heads where the width allows it
        self.num_heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)  # qkv bias, as the official probe
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def pool(self, x: Tensor) -> Tensor:
        """(B, N, D) tokens -> (B, D) pooled query."""
        b, n, d = x.shape
        h = self.num_heads
        query = self.query.expand(b, -1, -1)
        q = self.q(query).view(b, 1, h, d // h).transpose(1, 2)
        k, v = self.kv(self.norm1(x)).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        query = query + attended
        query = query + self.mlp(self.norm2(query))
        return query[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(x))


def _fit(train_tokens: Tensor, train_labels: Tensor, num_classes: int, *, epochs: int, lr: float, weight_decay: float,
         batch_size: int, num_heads: int, seed: int, device: torch.device) -> tuple[AttentiveClassifier, float]:
    """An :class:`AttentiveClassifier` trained on the tokens (AdamW, one warm-up epoch, cosine), and its last loss."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AttentiveClassifier(train_tokens.shape[-1], num_classes, num_heads).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and n != "query"]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1 or n == "query"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr)
    n = train_tokens.shape[0]
    steps_per_epoch = max(1, n // batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    step, loss = 0, torch.tensor(float("nan"))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            loss = F.cross_entropy(model(train_tokens[idx].to(device, torch.float32)), train_labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model.eval(), float(loss.detach())


@torch.no_grad()
def _logits(model: AttentiveClassifier, tokens: Tensor, device: torch.device) -> Tensor:
    return torch.cat([model(chunk.to(device, torch.float32)).cpu() for chunk in tokens.split(256)])


def attentive_probe(train_tokens: Tensor, train_labels: Tensor, test_tokens: Tensor, test_labels: Tensor, *,
                    epochs: int = 20, lrs: tuple[float, ...] = LRS, weight_decay: float = 0.01, batch_size: int = 64,
                    num_heads: int = 16, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """Train an :class:`AttentiveClassifier` on frozen (N, T, D) tokens and score it on the test tokens.

    With several ``lrs`` the learning rate is chosen on a held-out tenth of the training tokens (a fixed random
    tenth, stratified by nothing but the seed), then the probe is trained again on all of them at that rate
    (V-JEPA 2 trains a head per lr and weight decay and reports the best on the test set; choosing on held-out
    training clips keeps the test set unseen). Returns ``top1`` (and ``top5`` with more than 5 classes) in
    percent, the chosen ``lr``, the validation accuracy of every rate, the final training loss and the
    settings. Deterministic for a ``seed``."""
    if train_tokens.dim() != 3 or test_tokens.dim() != 3:
        raise ValueError(f"attentive_probe takes tokens (N, T, D), got {tuple(train_tokens.shape)} and "
                         f"{tuple(test_tokens.shape)}")
    if epochs < 1 or batch_size < 1 or not lrs:
        raise ValueError(f"epochs and batch_size must be >= 1 and lrs not empty, got {epochs}, {batch_size}, {lrs}")
    device = torch.device(device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    fit = {"epochs": epochs, "weight_decay": weight_decay, "batch_size": batch_size, "num_heads": num_heads,
           "seed": seed, "device": device}
    validation: dict[str, float] = {}
    lr = lrs[0]
    if len(lrs) > 1:
        order = torch.randperm(train_tokens.shape[0], generator=torch.Generator().manual_seed(seed))
        held, kept = order[: max(1, len(order) // 10)], order[max(1, len(order) // 10):]
        for candidate in lrs:
            model, _ = _fit(train_tokens[kept], train_labels[kept], num_classes, lr=candidate, **fit)
            hit = _logits(model, train_tokens[held], device).argmax(1) == train_labels[held].cpu()
            validation[f"{candidate:g}"] = float(hit.float().mean() * 100)
        lr = max(lrs, key=lambda c: validation[f"{c:g}"])
    model, loss = _fit(train_tokens, train_labels, num_classes, lr=lr, **fit)
    logits = _logits(model, test_tokens, device)
    target = test_labels.cpu()
    result = {"top1": float((logits.argmax(1) == target).float().mean() * 100), "lr": lr,
              **({"validation_top1_by_lr": validation} if validation else {}), "final_train_loss": loss,
              "epochs": epochs, "weight_decay": weight_decay, "batch_size": batch_size, "heads": model.num_heads}
    if num_classes > 5:
        top5 = logits.topk(5, dim=1).indices
        result["top5"] = float((top5 == target[:, None]).any(1).float().mean() * 100)
    return result
