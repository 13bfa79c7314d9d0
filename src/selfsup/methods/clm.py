"""Causal language modeling: GPT (Radford, Narasimhan, Salimans, Sutskever 2018, "Improving Language
Understanding by Generative Pre-Training"; Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", GPT-2).

A causal transformer predicts every next token of a block (eq. 1 of GPT):

    L = -Σ_t log P(u_t | u_{t-k}, ..., u_{t-1}; Θ),   P = softmax(h_{t-1} W_e^T)

with ``h`` the final hidden states and the output projection tied to the token embedding ``W_e``
(GPT's eq. 2; ``tie_weights``). Each training block holds ``seq_len + 1`` tokens: inputs are the
first ``seq_len``, targets the last ``seq_len`` (the inputs shifted by one).

Defaults: GPT-2's pre-LayerNorm encoder (``backbone.norm: pre``, learned positions), weights tied,
byte-level BPE tokenizer. Recipes: ``configs/clm/shakespeare_char.yaml`` (nanoGPT's
``shakespeare_char`` CPU settings: 4 layers, 4 heads, 128 wide, block 64, batch 12, 2,000 steps,
AdamW lr 1e-3 with betas (0.9, 0.99), weight decay 0.1, 100 warmup steps, cosine to 1e-4, gradient
clipping 1.0, no biases, no dropout) and ``configs/clm/gpt2.yaml`` (GPT-2 small: 12 x 768, 1,024
positions, batch 512 sequences, AdamW 6e-4; the paper's own schedule is not published, these are
nanoGPT's reproduction settings).

Evaluation: held-out next-token loss and perplexity (``selfsup eval perplexity``); sequence
features for the probes are the causal hidden states averaged over the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core.method import MethodConfig, StepOutput
from selfsup.losses import token_cross_entropy
from selfsup.modalities.text import TextMethod
from selfsup.registry import register_method


@dataclass
class CLMConfig(MethodConfig):
    name: str = "clm"
    tie_weights: bool = True  # output projection = token embedding (GPT eq. 2, GPT-2, nanoGPT)


@register_method
class CLM(TextMethod):
    name = "clm"
    paper = "Radford et al. 2018/2019, GPT / GPT-2: causal language modeling"
    family = "autoregressive"
    Config = CLMConfig
    causal = True
    default_tokenizer = "bpe"
    language_model = True
    figures = ("predictions",)

    def __init__(self, cfg: CLMConfig, backbone: nn.Module, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        self.head = nn.Linear(backbone.embed_dim, backbone.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = backbone.model.tok_embed.weight
        else:
            nn.init.normal_(self.head.weight, std=0.02)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token scores (B, L, V) at every position of ``tokens`` (B, L)."""
        return self.head(self.backbone.tokens(tokens, causal=True))

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        tokens = self.check(batch)["tokens"]
        h = self.backbone.tokens(tokens[:, :-1], causal=True)
        loss, acc = token_cross_entropy(self.head(h), tokens[:, 1:])
        # no embeddings for the collapse monitor: a language model's targets are the data, it cannot collapse
        return StepOutput(loss, {"acc": acc.detach(), "ppl": loss.detach().exp()})

    @torch.no_grad()
    def lm_scores(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        tokens = self.check(batch)["tokens"]
        logits = self.logits(tokens[:, :-1]).float()
        target = tokens[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        correct = (logits.argmax(-1) == target).sum()
        return {"nll": float(nll), "correct": float(correct), "count": float(target.numel())}

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """Sample ``new_tokens`` continuations of ``prompt`` (B, L) as GPT does, the context cropped
        to the encoder's positions; temperature 0 takes the most likely token."""
        out = prompt
        for _ in range(new_tokens):
            logits = self.logits(out[:, -self.backbone.max_len:])[:, -1].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                nxt = torch.multinomial(logits.softmax(-1), 1)
            out = torch.cat([out, nxt], dim=1)
        return out

    @torch.no_grad()
    def predictions(self, texts: list[str]) -> list[str]:
        """Each text's first half as a prompt and the model's greedy continuation, marked ``>>``."""
        tok, lines = self.tokenizer, []
        device = next(self.parameters()).device
        for text in texts:
            ids = tok.encode(text)[: self.backbone.max_len]
            prompt = ids[: max(1, len(ids) // 2)]
            out = self.generate(torch.tensor([prompt], device=device), min(40, self.backbone.max_len), temperature=0)
            lines.append(f"{tok.decode(prompt)} >> {tok.decode(out[0, len(prompt):].tolist())}")
        return lines
