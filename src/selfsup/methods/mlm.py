"""Masked language modeling: BERT (Devlin, Chang, Lee, Toutanova 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding", NAACL) with RoBERTa's dynamic masking (Liu et
al. 2019, "RoBERTa: A Robustly Optimized BERT Pretraining Approach").

Of each sequence's tokens, 15% are selected (``mask_prob``); a selected token is replaced by
``[MASK]`` 80% of the time, by a random token 10% and left unchanged 10% (BERT sec. 3.1, appendix
C.2), and the encoder predicts the original token at the selected positions only:

    L = -1/|M| Σ_{i ∈ M} log softmax(W_e^T g(h_i) + b)[x_i]

with ``g`` BERT's transform (dense, GELU, LayerNorm) and the output matrix tied to the token
embedding ``W_e`` plus a bias (BERT's ``cls.predictions``). Masks are drawn afresh at every step
(RoBERTa's dynamic masking, sec. 4.1), with the per-sequence count ``floor(0.15 n + U)`` of
fairseq's ``MaskTokensDataset``; ``whole_word`` selects whole words (BERT's whole word masking:
all pieces of a word together; WordPiece ``##`` continuations, or byte-level BPE's space-led words).
The training blocks are packed text (RoBERTa's FULL-SENTENCES), documents separated by ``[SEP]``,
and no next-sentence prediction (RoBERTa found it does not help).

Defaults are the paper's: 15%, 80/10/10, tied output, WordPiece tokenizer. ``configs/mlm/bert_base.yaml``
is BERT-base (12 x 768, post-LN, 512 positions, AdamW lr 1e-4, betas (0.9, 0.999), weight decay
0.01, 10k warm-up steps, 1M steps of 256 sequences); ``configs/mlm/sst2_cpu.yaml`` is a CPU-sized run.
An encoder with ``backbone.norm: post`` and learned positions exports as a Hugging Face ``BertModel``.

Evaluation: masked-token accuracy and perplexity on held-out blocks (``selfsup eval perplexity``,
masks drawn from a fixed seed), probes on mean-pooled features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import token_cross_entropy
from selfsup.modalities.text import TextMethod
from selfsup.pretext.text_masking import IGNORE_INDEX, mlm_mask
from selfsup.registry import register_method

EVAL_MASK_SEED = 1234  # held-out masks are drawn from this seed, so every evaluation scores the same positions


@dataclass
class MLMConfig(MethodConfig):
    name: str = "mlm"
    mask_prob: float = 0.15  # share of tokens selected for prediction (BERT)
    mask_frac: float = 0.8  # of the selected: replaced by [MASK]
    random_frac: float = 0.1  # of the selected: replaced by a random token (the rest stay unchanged)
    whole_word: bool = False  # select whole words (BERT's whole word masking)
    tie_weights: bool = True  # output matrix = token embedding (BERT)

    def validate(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"method.mask_prob={self.mask_prob}: must be in (0, 1)")
        if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1.0:
            raise ConfigError(f"method.mask_frac={self.mask_frac}, method.random_frac={self.random_frac}: "
                              "must be >= 0 and sum to at most 1")


class MLMHead(nn.Module):
    """BERT's ``cls.predictions``: dense + GELU + LayerNorm, then the (tied) vocabulary projection plus a bias."""

    def __init__(self, dim: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h)))) + self.bias


@register_method
class MLM(TextMethod):
    name = "mlm"
    paper = "Devlin et al. 2019, BERT (with RoBERTa's dynamic masking)"
    family = "masked"
    Config = MLMConfig
    default_tokenizer = "wordpiece"
    language_model = True
    figures = ("predictions",)

    def __init__(self, cfg: MLMConfig, backbone: nn.Module, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        eps = 1e-12 if backbone.norm_type == "post" else 1e-5
        self.head = MLMHead(backbone.embed_dim, backbone.vocab_size, eps)
        if cfg.tie_weights:
            self.head.decoder.weight = backbone.model.tok_embed.weight
        else:
            nn.init.normal_(self.head.decoder.weight, std=0.02)
        self._word_starts: torch.Tensor | None = None

    def word_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) index of each token's word in its row (-1 for special tokens), for whole-word masking."""
        if self._word_starts is None or self._word_starts.device != tokens.device:
            self._word_starts = self.tokenizer.word_starts().to(tokens.device)
        special = torch.isin(tokens, torch.tensor(self.tokenizer.special_ids, device=tokens.device))
        starts = self._word_starts[tokens] | special
        starts[:, 0] = True  # a row opening inside a word starts its first word there
        ids = starts.long().cumsum(1) - 1
        return ids.masked_fill(special, -1)

    def mask(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of ``tokens`` under the 80/10/10 rule; labels are -100 where not selected."""
        c, tok = self.cfg, self.tokenizer
        return mlm_mask(tokens, vocab_size=tok.vocab_size, mask_id=tok.mask_id, special_ids=tok.special_ids,
                        prob=c.mask_prob, mask_frac=c.mask_frac, random_frac=c.random_frac,
                        word_ids=self.word_ids(tokens) if c.whole_word else None, generator=generator)

    def masked_logits(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocabulary scores at the selected positions only (as BERT's ``gather_indexes``) and their targets."""
        h = self.backbone.tokens(inputs)
        selected = labels != IGNORE_INDEX
        return self.head(h[selected]), labels[selected]

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        tokens = self.inputs(self.check(batch))
        inputs, labels = self.mask(tokens)
        logits, targets = self.masked_logits(inputs, labels)
        loss, acc = token_cross_entropy(logits, targets)
        return StepOutput(loss, {"mlm_acc": acc.detach(), "ppl": loss.detach().exp()})

    @torch.no_grad()
    def lm_scores(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        tokens = self.inputs(self.check(batch))
        generator = torch.Generator(device=tokens.device).manual_seed(EVAL_MASK_SEED)
        inputs, labels = self.mask(tokens, generator)
        logits, targets = self.masked_logits(inputs, labels)
        logits = logits.float()
        nll = F.cross_entropy(logits, targets, reduction="sum")
        return {"nll": float(nll), "correct": float((logits.argmax(-1) == targets).sum()),
                "count": float(targets.numel())}

    @torch.no_grad()
    def fill_masks(self, tokens: torch.Tensor, labels: torch.Tensor, top: int = 3) -> torch.Tensor:
        """The ``top`` most likely tokens (n_selected, top) at the selected positions of masked ``tokens``."""
        logits, _ = self.masked_logits(tokens, labels)
        return logits.float().topk(top, dim=-1).indices

    @torch.no_grad()
    def predictions(self, texts: list[str]) -> list[str]:
        """Each text with 15% of its tokens masked (a fixed seed), each mask shown as
        ``[original→guess1/guess2/guess3]``."""
        tok, lines = self.tokenizer, []
        device = next(self.parameters()).device
        for i, text in enumerate(texts):
            ids = torch.tensor([tok.encode(text)[: self.backbone.max_len]], device=device)
            if ids.shape[1] < 2:
                continue
            g = torch.Generator(device=device).manual_seed(EVAL_MASK_SEED + i)
            selected = torch.zeros_like(ids, dtype=torch.bool)
            k = max(1, round(self.cfg.mask_prob * ids.shape[1]))
            selected[0, torch.randperm(ids.shape[1], generator=g, device=device)[:k]] = True
            inputs = ids.masked_fill(selected, tok.mask_id)
            labels = ids.masked_fill(~selected, IGNORE_INDEX)
            guesses = self.fill_masks(inputs, labels).tolist()
            pieces, j = [], 0
            for pos, t in enumerate(ids[0].tolist()):
                if selected[0, pos]:
                    pieces.append(f"[{tok.token(t)}→{'/'.join(tok.token(x) for x in guesses[j])}]")
                    j += 1
                else:
                    pieces.append(tok.token(t))
            lines.append(" ".join(pieces))
        return lines
