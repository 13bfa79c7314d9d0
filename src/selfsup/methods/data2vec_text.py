"""data2vec for text (Baevski, Hsu, Xu, Babu, Gu, Auli 2022, "data2vec: A General Framework for
Self-supervised Learning in Speech, Vision and Language", ICML), as the official
``examples/data2vec/models/data2vec_text.py`` of fairseq.

A student encoder sees a BERT-masked sequence (15% of tokens selected, 80% [MASK] / 10% random /
10% kept, RoBERTa's dynamic masking) and regresses, at the selected positions, what an EMA teacher
computes from the unmasked sequence: the average of the teacher's top-K blocks' feed-forward
outputs (before each block's last residual connection), each instance-normalized over the
sequence (sec. 3.3, eq. 1-2):

    y_t = 1/K Σ_{l = L-K+1}^{L} IN(a_t^l),     L = 1/|M| Σ_{t ∈ M} ||W h_t - y_t||² / sqrt(D)

``W`` is a single linear regression head on the student's final states (``head_layers=1`` for
text); no normalization of the averaged target (text: instance norm per layer only); the L2 loss
scaled by 1/sqrt(D) (``loss_beta=0``, ``loss_scale=None``). Only the transformer layers are
averaged into the teacher (``ema_transformer_layers_only``): the teacher reads the student's
embeddings. The teacher's decay goes linearly from ``ema_decay`` 0.999 to ``ema_end_decay``
0.9999 over ``ema_anneal_end_step`` 300k updates (``get_annealed_rate``), and it runs in eval mode.

Defaults are the paper's base setting (K = 8 of 12 blocks, RoBERTa-base encoder, byte-level BPE).
``configs/data2vec_text/roberta_base.yaml`` has the paper's optimization (Adam lr 2e-4, betas
(0.9, 0.98), weight decay 0.01, 1M updates of 256 x 512 tokens); ``configs/data2vec_text/sst2_cpu.yaml``
is a CPU-sized run with a 4-block encoder, where K = 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import data2vec_loss, data2vec_targets
from selfsup.modalities.text import TextMethod
from selfsup.nn.teacher import AnnealedBlockEMA, check_annealed_decay, make_teacher
from selfsup.pretext.text_masking import IGNORE_INDEX, mlm_mask
from selfsup.registry import register_method


@dataclass
class Data2VecTextConfig(MethodConfig):
    name: str = "data2vec_text"
    top_k: int = 8  # average_top_k_layers (base: 8 of 12)
    mask_prob: float = 0.15
    mask_frac: float = 0.8  # of the selected: [MASK] (leave_unmasked_prob 0.1, random_token_prob 0.1)
    random_frac: float = 0.1
    ema_decay: float = 0.999
    ema_end_decay: float = 0.9999
    ema_anneal_end_step: int = 300_000
    loss_beta: float = 0.0  # 0: L2; > 0: smooth L1 with this beta (official loss_beta)

    def validate(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"method.top_k={self.top_k}: must be >= 1")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"method.mask_prob={self.mask_prob}: must be in (0, 1)")
        if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1.0:
            raise ConfigError("method.mask_frac and method.random_frac must be >= 0 and sum to at most 1")
        check_annealed_decay(self)
        if self.loss_beta < 0:
            raise ConfigError(f"method.loss_beta={self.loss_beta}: must be >= 0")


@register_method
class Data2VecText(AnnealedBlockEMA, TextMethod):
    name = "data2vec_text"
    paper = "Baevski et al. 2022, data2vec (text)"
    family = "masked"
    Config = Data2VecTextConfig
    default_tokenizer = "bpe"

    def __init__(self, cfg: Data2VecTextConfig, backbone: nn.Module, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        if cfg.top_k > backbone.depth:
            raise ConfigError(f"method.top_k={cfg.top_k} is more than the encoder's {backbone.depth} blocks")
        self.teacher = make_teacher(backbone)
        self.regression_head = nn.Linear(backbone.embed_dim, backbone.embed_dim)
        self.register_buffer("ema_decay_now", torch.tensor(float(cfg.ema_decay), dtype=torch.float64))

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher, self.backbone)]

    @torch.no_grad()
    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) teacher targets of the unmasked ``tokens``: the top-K blocks' FFN outputs,
        each instance-normalized over the sequence, averaged."""
        self.teacher.eval()  # the official teacher runs without dropout
        embedded = self.backbone.embed(tokens).detach()  # ema_transformer_layers_only: the student's embeddings
        _, layers = self.teacher.tokens(tokens, inputs=embedded, return_layers=True)
        return data2vec_targets([ffn for _, ffn in layers], self.cfg.top_k, instance_norm_layers=True,
                                layer_norm_targets=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        c, tok = self.cfg, self.tokenizer
        tokens = self.inputs(self.check(batch))
        inputs, labels = mlm_mask(tokens, vocab_size=tok.vocab_size, mask_id=tok.mask_id, special_ids=tok.special_ids,
                                  prob=c.mask_prob, mask_frac=c.mask_frac, random_frac=c.random_frac)
        selected = labels != IGNORE_INDEX
        y = self.targets(tokens)[selected]
        h = self.backbone.tokens(inputs)
        pred = self.regression_head(h[selected])
        loss = data2vec_loss(pred, y, beta=c.loss_beta) if selected.any() else pred.sum() * 0.0
        metrics = {"data2vec/ema_decay": self.ema_decay_now.detach().clone()}
        with torch.no_grad():
            metrics["data2vec/target_var"] = y.float().var(0).mean() if len(y) > 1 else y.new_zeros(())
            metrics["data2vec/pred_var"] = pred.detach().float().var(0).mean() if len(pred) > 1 else y.new_zeros(())
        return StepOutput(loss, metrics, embeddings=self.backbone.pool_tokens(h, None).detach())
