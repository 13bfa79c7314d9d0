"""Span corruption: T5 (Raffel, Shazeer, Roberts, Lee, Narang, Matena, Zhou, Li, Liu 2020, "Exploring
the Limits of Transfer Learning with a Unified Text-to-Text Transformer", JMLR 21).

An encoder-decoder transformer restores the spans dropped from its input (sec. 3.1.4, Fig. 2; spans
of mean length 3, sec. 3.3.4). In each block of L tokens, round(0.15 L) are noise
(``noise_density``), split into round(0.15 L / 3) spans (``mean_span``) placed at random, as T5's
``random_spans_noise_mask`` draws them. Each noise span becomes one sentinel in the encoder's input,
and the decoder writes out the dropped spans, each after its sentinel:

    original: Thank you for inviting me to your party last week .
    inputs:   Thank you <X> me to your party <Y> week . </s>
    targets:  <X> for inviting <Y> last <Z> </s>

The decoder is trained by teacher forcing, its inputs the targets shifted right behind a start token
(the pad id, T5's decoder start token):

    L = -1/|y| Σ_t log softmax(W_e (d^-1/2 g_t))[y_t],   g = decoder(y_<t, encoder(x))

The encoder is the backbone (bidirectional); the decoder (this file) has ``decoder_depth`` pre-LayerNorm
blocks (T5 is pre-norm), each causal self-attention, cross-attention to the encoder's output and an
MLP, then a final LayerNorm. One token embedding ``W_e`` serves the encoder, the decoder and the output
layer (sec. 3.1.1; ``tie_weights``); when tied, T5 scales the decoder's output by d_model^-1/2 before the
projection (Mesh TensorFlow's ``transformer.py``, Hugging Face's ``T5ForConditionalGeneration``). That
scale goes with T5's embedding init of std 1; with the GPT-2 init (std 0.02) of our encoder it shrinks
the first logits 50-fold and slowed early training (loss 5.26 vs 3.70 nats after 30 steps on one
batch, 128 wide), so it is off by default, as in GPT-2 and BERT (``scale_output: true`` turns it on).

Defaults are the paper's: noise density 0.15, mean span 3, 100 sentinels (T5's ``<extra_id_0>`` ...
``<extra_id_99>``), a decoder as deep as the encoder (the baseline mirrors them, sec. 3.1.1: 12 + 12
blocks, 768 wide, 12 heads, MLP 3072), tied embeddings, dropout from ``backbone.dropout``. Departures:

- positions: T5 adds a learned relative position bias to the attention scores (32 buckets, shared by
  the layers of a stack); here the encoder keeps its own scheme (``backbone.pos_embed``), so it stays
  the library's text encoder and exports as one, and the decoder has learned absolute positions
  (``max_target_len`` of them);
- end of sequence: our tokenizers have no ``</s>``; ``[SEP]`` (their document separator) ends inputs
  and targets;
- blocks: the decoder's are the encoder's (GELU MLP, LayerNorm with a bias unless ``backbone.bias:
  false``), where T5 1.0 has ReLU, a scale-only LayerNorm and no biases; initialization is the
  encoder's (GPT-2's N(0, 0.02)), not Mesh TensorFlow's;
- tokenizer: byte-level BPE trained on the corpus (T5: a 32k SentencePiece vocabulary);
- optimizer: T5 pre-trains with Adafactor at 1/sqrt(max(n, 10^4)) for 2^19 steps (sec. 3.1.2); the
  recipes use AdamW with the library's warm-up and cosine decay (``configs/t5/t5_base.yaml`` says how
  they map).

Lengths: a block of L tokens gives encoder inputs of L - noise + spans + 1 tokens and targets of
noise + spans + 1; T5's ``random_spans_helper`` takes L = 568 so that inputs are 512 and targets 114.
The first step at a length checks that the inputs fit ``backbone.max_len``, the targets
``max_target_len`` and the spans the tokenizer's sentinels (one-line ConfigErrors).

Recipes: ``configs/t5/shakespeare_cpu.yaml`` (a tiny model on tiny-shakespeare, CPU-sized) and
``configs/t5/t5_base.yaml`` (the paper's baseline as far as it maps).

Evaluation: loss, perplexity and accuracy of the span targets on held-out blocks (``selfsup eval
perplexity``, the noise drawn from a fixed seed); the probes read the encoder (``encode``: its
bidirectional states, mean-pooled).

Example::

    tok = train_tokenizer("bpe", texts, 2048, sentinels=100)
    enc = TextEncoder(vocab_size=tok.vocab_size, max_len=129, tokenizer=tok)
    model = T5SpanCorruption(T5Config(), enc)
    loss, metrics = model({"tokens": blocks})          # blocks (B, 129): 128 tokens + 1
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.backbones.text import TextBlock
from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import token_cross_entropy
from selfsup.modalities.text import TextMethod
from selfsup.pretext.text_masking import random_spans_noise_mask, span_corruption
from selfsup.registry import register_method

EVAL_NOISE_SEED = 1234  # held-out noise is drawn from this seed, so every evaluation scores the same spans
LN_EPS = 1e-6  # T5's layer_norm_epsilon


@dataclass
class T5Config(MethodConfig):
    name: str = "t5"
    noise_density: float = 0.15  # share of each block's tokens dropped (T5)
    mean_span: float = 3.0  # mean length of the dropped spans (T5, sec. 3.3.4)
    max_sentinels: int = 100  # <extra_id_N> tokens a trained tokenizer gets (T5's 100 extra ids)
    max_target_len: int = 128  # decoder positions; targets are round(0.15 L) + round(0.05 L) + 1 tokens
    decoder_depth: int | None = None  # decoder blocks (default: the encoder's depth, as T5's baseline)
    tie_weights: bool = True  # output matrix = the shared token embedding (T5 1.0; T5 1.1 unties it)
    scale_output: bool = False  # T5's d_model^-0.5 before the tied projection (pairs with std-1 embeddings)

    def validate(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ConfigError(f"method.noise_density={self.noise_density}: must be in (0, 1)")
        if not self.mean_span >= 1.0:
            raise ConfigError(f"method.mean_span={self.mean_span}: must be >= 1 (a span has at least one token)")
        if self.max_sentinels < 1:
            raise ConfigError(f"method.max_sentinels={self.max_sentinels}: must be >= 1")
        if self.max_target_len < 2:
            raise ConfigError(f"method.max_target_len={self.max_target_len}: must be >= 2")
        if self.decoder_depth is not None and self.decoder_depth < 1:
            raise ConfigError(f"method.decoder_depth={self.decoder_depth}: must be >= 1 (or null: the encoder's)")


class DecoderBlock(TextBlock):
    """A pre-LayerNorm decoder block: causal self-attention and the GELU MLP of ``TextBlock``, with
    cross-attention to the encoder's states between them (the Transformer's decoder layer)."""

    def __init__(self, dim: int, num_heads: int, *, bias: bool = True, dropout: float = 0.0,
                 eps: float = LN_EPS) -> None:
        super().__init__(dim, num_heads, norm="pre", bias=bias, dropout=dropout, eps=eps)
        self.norm_cross = nn.LayerNorm(dim, eps=eps, bias=bias)
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.cross_proj = nn.Linear(dim, dim, bias=bias)

    def cross_attention(self, x: Tensor, memory: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(memory).view(b, memory.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.cross_proj(out.transpose(1, 2).reshape(b, n, d)))

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:  # type: ignore[override]
        x = x + self.attention(self.norm1(x), None, True, None)
        x = x + self.cross_attention(self.norm_cross(x), memory)
        return x + self.mlp(self.norm2(x))


class T5Decoder(nn.Module):
    """Decoder blocks over token embeddings plus learned positions, then a final LayerNorm."""

    def __init__(self, dim: int, depth: int, num_heads: int, max_len: int, *, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(max_len, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads, bias=bias, dropout=dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS, bias=bias)
        self._init_weights(depth)

    @torch.no_grad()
    def _init_weights(self, depth: int) -> None:
        """The encoder's (GPT-2's): N(0, 0.02), zero biases, residual projections scaled down by the
        square root of the residual branches (three per block here, two in the encoder)."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            for proj in (block.proj, block.cross_proj, block.fc2):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(3 * depth))

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """Hidden states (B, T, D) of embedded decoder inputs ``x`` (B, T, D) reading ``memory`` (B, S, D)."""
        x = self.drop(x + self.pos_embed[: x.shape[1]].to(x.dtype))
        for block in self.blocks:
            x = block(x, memory)
        return self.norm(x)


def _runs(mask: Tensor) -> int:
    """Number of runs of True in a 1-D bool tensor."""
    return int((mask & ~torch.cat([mask.new_zeros(1), mask[:-1]])).sum())


@register_method
class T5SpanCorruption(TextMethod):
    name = "t5"
    paper = "Raffel et al. 2020, T5: span corruption (encoder-decoder)"
    family = "masked"
    Config = T5Config
    default_tokenizer = "bpe"
    language_model = True

    @classmethod
    def sentinels(cls, method_cfg: T5Config) -> int:
        return method_cfg.max_sentinels

    def __init__(self, cfg: T5Config, backbone: nn.Module, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        dim = backbone.embed_dim
        self.decoder = T5Decoder(dim, cfg.decoder_depth or backbone.depth, backbone.num_heads, cfg.max_target_len,
                                 bias=backbone.bias, dropout=backbone.model.drop.p)
        self.head = nn.Linear(dim, backbone.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = backbone.model.tok_embed.weight
        else:
            nn.init.normal_(self.head.weight, std=0.02)
        self.out_scale = dim**-0.5 if cfg.tie_weights and cfg.scale_output else 1.0  # T5's rescale (see above)
        self._sentinel_ids: dict = {}  # (length, device, tokenizer) -> sentinel ids, checked

    # ---- the objective ------------------------------------------------------------------

    def corrupt(self, tokens: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(encoder inputs, targets) of blocks ``tokens`` (B, L) under fresh random-span noise."""
        c = self.cfg
        noise = random_spans_noise_mask(tokens.shape[0], tokens.shape[1], noise_density=c.noise_density,
                                        mean_span=c.mean_span, generator=generator, device=tokens.device)
        return span_corruption(tokens, noise, self.sentinel_ids(noise), eos_id=self.tokenizer.sep_id)

    def sentinel_ids(self, noise: Tensor) -> Tensor:
        """The sentinels a noise mask (B, L) needs, on its device; the first mask of each length
        checks that its inputs, targets and spans fit the encoder, the decoder and the tokenizer."""
        key = (noise.shape[1], noise.device, self.tokenizer)
        if key not in self._sentinel_ids:
            self._sentinel_ids[key] = self._check_lengths(noise[0]).to(noise.device)
        return self._sentinel_ids[key]

    def _check_lengths(self, row: Tensor) -> Tensor:
        length, noise = row.numel(), int(row.sum())
        noise_spans, kept_spans = _runs(row), _runs(~row)
        inputs, targets = length - noise + noise_spans + 1, noise + kept_spans + 1
        if inputs > self.backbone.max_len:
            raise ConfigError(f"t5: blocks of {length} tokens (data.seq_len) give encoder inputs of {inputs} tokens, "
                              f"more than backbone.max_len={self.backbone.max_len}; raise it to {inputs}")
        if targets > self.cfg.max_target_len:
            raise ConfigError(f"t5: blocks of {length} tokens (data.seq_len) give targets of {targets} tokens, more "
                              f"than method.max_target_len={self.cfg.max_target_len}; raise it to {targets}")
        spans = max(noise_spans, kept_spans)
        try:
            return self.tokenizer.sentinel_ids(spans)
        except ConfigError:
            raise ConfigError(f"t5: blocks of {length} tokens (data.seq_len) have {spans} spans, one sentinel token "
                              "<extra_id_N> each, and the tokenizer has fewer; a tokenizer trained for t5 gets "
                              f"method.max_sentinels={self.cfg.max_sentinels} of them") from None

    def shift_right(self, targets: Tensor) -> Tensor:
        """Decoder inputs: the targets one step late, behind the start token (the pad id, as T5)."""
        start = targets.new_full((targets.shape[0], 1), self.tokenizer.pad_id)
        return torch.cat([start, targets[:, :-1]], dim=1)

    def logits(self, inputs: Tensor, decoder_inputs: Tensor) -> Tensor:
        """Scores (B, T, V) of each next target token, from encoder ``inputs`` (B, S) and ``decoder_inputs`` (B, T)."""
        memory = self.backbone.tokens(inputs)  # bidirectional
        h = self.decoder(self.backbone.model.tok_embed(decoder_inputs), memory)
        return self.head(h * self.out_scale)

    def forward(self, batch: dict[str, Tensor]) -> StepOutput:
        tokens = self.inputs(self.check(batch))
        inputs, targets = self.corrupt(tokens)
        loss, acc = token_cross_entropy(self.logits(inputs, self.shift_right(targets)), targets)
        # no embeddings for the collapse monitor: the targets are the data, it cannot collapse
        return StepOutput(loss, {"span_acc": acc.detach(), "ppl": loss.detach().exp()})

    @torch.no_grad()
    def lm_scores(self, batch: dict[str, Tensor]) -> dict[str, float]:
        tokens = self.inputs(self.check(batch))
        generator = torch.Generator(device=tokens.device).manual_seed(EVAL_NOISE_SEED)
        inputs, targets = self.corrupt(tokens, generator)
        logits = self.logits(inputs, self.shift_right(targets)).float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        return {"nll": float(nll), "correct": float((logits.argmax(-1) == targets).sum()),
                "count": float(targets.numel())}
