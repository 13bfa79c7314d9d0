"""Transformer text encoders: token ids in, one vector per token (``tokens``) or per sequence
(``forward``) out.

One module covers the two layouts the text methods need:

- ``norm: pre`` (default): pre-LayerNorm blocks and a final LayerNorm, as GPT-2 and nanoGPT
  (Radford et al. 2019); stable without warmup tricks, the layout of today's LMs;
- ``norm: post``: post-LayerNorm blocks after an embedding LayerNorm, exactly BERT's layout
  (Devlin et al. 2019), LayerNorm eps 1e-12.

Positions: ``learned`` (GPT-2, BERT), fixed 1-D ``sincos`` (Vaswani et al. 2017) or ``rotary``
(RoFormer, Su et al. 2021; GPT-NeoX's half-split rotation of each head's queries and keys).
Attention is ``scaled_dot_product_attention``, causal when the method asks (``causal=True``:
GPT), otherwise over the non-padding tokens (``attention_mask``). MLP ratio 4, exact GELU.
``bias: false`` drops every Linear and LayerNorm bias (nanoGPT's shakespeare_char setting).

Initialization is GPT-2's (as nanoGPT writes it): Linear and embedding weights N(0, 0.02), zero
biases, and the two residual output projections of each block N(0, 0.02 / sqrt(2 * depth)).

Sizes (``backbone.name``): ``text_tiny`` 128 wide, 4 blocks, 4 heads (nanoGPT's CPU recipe);
``text_mini`` 256/4/4; ``text_small`` 512/6/8; ``text_base`` 768/12/12 (BERT-base, GPT-2 small).
``backbone.embed_dim`` / ``depth`` / ``num_heads`` override a size; ``backbone.vocab_size`` comes
from the tokenizer and ``backbone.max_len`` (positions) from ``data.seq_len`` unless set.

The encoder carries its tokenizer (``self.tokenizer``, kept as extra state in every state dict),
so a checkpoint is self-contained and ``selfsup export`` writes ``tokenizer.json`` beside the
weights. Under Hugging Face ``transformers`` names (``hf_export``): a pre-LN encoder with learned
positions as ``GPT2Model`` (trained causally, it is GPT-2), a post-LN one with learned positions as
``BertModel``; rotary or sin-cos positions, and a pre-LN encoder trained bidirectionally, have no
equivalent there (``hf_export`` says so).

Example::

    enc = build_backbone(BackboneConfig(name="text_tiny", vocab_size=100, max_len=64))
    ids = torch.randint(5, 100, (2, 64))
    h = enc.tokens(ids, causal=True)       # (2, 64, 128)
    v = enc(ids)                           # (2, 128): mean over the tokens
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.backbones import Backbone
from selfsup.config import BackboneConfig
from selfsup.errors import ConfigError
from selfsup.registry import register_backbone

__all__ = ["TEXT_SIZES", "TextBlock", "TextEncoder", "hf_export"]

# name -> (embed_dim, depth, num_heads)
TEXT_SIZES: dict[str, tuple[int, int, int]] = {
    "text_tiny": (128, 4, 4),
    "text_mini": (256, 4, 4),
    "text_small": (512, 6, 8),
    "text_base": (768, 12, 12),
}


def sincos_1d(length: int, dim: int) -> Tensor:
    """The Transformer's fixed table (length, dim): sin on even channels, cos on odd ones."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    omega = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * omega)
    table[:, 1::2] = torch.cos(pos * omega[: dim // 2])
    return table.float()


def rotary_tables(length: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin (length, head_dim) of RoFormer's rotation angles, in GPT-NeoX's half-split layout."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, L, hd) queries or keys by position: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class TextBlock(nn.Module):
    """One transformer block: self-attention and a GELU MLP, pre- or post-LayerNorm."""

    def __init__(self, dim: int, num_heads: int, *, norm: str = "pre", bias: bool = True, dropout: float = 0.0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads, self.post_norm, self.dropout = num_heads, norm == "post", dropout
        self.norm1 = nn.LayerNorm(dim, eps=eps, bias=bias)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps, bias=bias)
        self.fc1 = nn.Linear(dim, 4 * dim, bias=bias)
        self.fc2 = nn.Linear(4 * dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def attention(self, x: Tensor, mask: Tensor | None, causal: bool, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))

    def mlp(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False,
                rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(block output, its MLP output before the residual sum: data2vec's text targets)."""
        if self.post_norm:
            x = self.norm1(x + self.attention(x, mask, causal, rope))
            ffn = self.mlp(x)
            return self.norm2(x + ffn), ffn
        x = x + self.attention(self.norm1(x), mask, causal, rope)
        ffn = self.mlp(self.norm2(x))
        return x + ffn, ffn


class TextModel(nn.Module):
    """The parameters of a text encoder (``TextEncoder.model``): embeddings, blocks, norms."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, depth: int, num_heads: int, *, norm: str,
                 pos_embed: str, bias: bool, dropout: float) -> None:
        super().__init__()
        eps = 1e-12 if norm == "post" else 1e-5  # BERT's and GPT-2's
        self.tok_embed = nn.Embedding(vocab_size, dim)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(max_len, dim))
        elif pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_1d(max_len, dim), persistent=False)
        else:
            self.pos_embed = None
        self.embed_norm = nn.LayerNorm(dim, eps=eps, bias=bias) if norm == "post" else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TextBlock(dim, num_heads, norm=norm, bias=bias, dropout=dropout, eps=eps)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps, bias=bias) if norm == "pre" else nn.Identity()


class TextEncoder(Backbone):
    """A transformer over token ids; ``forward`` pools it to (B, D) (mean over non-padding tokens,
    or the first token with ``pool: cls``), ``tokens`` gives (B, L, D)."""

    def __init__(self, *, vocab_size: int, max_len: int = 512, embed_dim: int = 128, depth: int = 4,
                 num_heads: int = 4, norm: str = "pre", pos_embed: str = "learned", pool: str = "mean",
                 bias: bool = True, dropout: float = 0.0, tokenizer=None) -> None:
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
        if pos_embed not in ("learned", "sincos", "rotary"):
            raise ValueError(f"pos_embed must be learned, sincos or rotary, got {pos_embed!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        model = TextModel(vocab_size, max_len, embed_dim, depth, num_heads, norm=norm, pos_embed=pos_embed,
                          bias=bias, dropout=dropout)
        super().__init__(model, embed_dim, "selfsup")
        self.vocab_size, self.max_len, self.embed_dim, self.depth, self.num_heads = (
            vocab_size, max_len, embed_dim, depth, num_heads)
        self.norm_type, self.pos_embed_type, self.pool, self.bias = norm, pos_embed, pool, bias
        self.tokenizer = tokenizer
        if pos_embed == "rotary":
            cos, sin = rotary_tables(max_len, embed_dim // num_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2's: N(0, 0.02) weights, zero biases, residual projections N(0, 0.02 / sqrt(2 depth))."""
        for mod in self.model.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        if isinstance(self.model.pos_embed, nn.Parameter):
            nn.init.normal_(self.model.pos_embed, std=0.02)
        for block in self.model.blocks:
            for proj in (block.proj, block.fc2):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.depth))

    # ---- the tokenizer travels in the state dict ---------------------------------------

    def get_extra_state(self) -> dict:
        return {"tokenizer": self.tokenizer.to_json() if self.tokenizer is not None else None}

    def set_extra_state(self, state: dict) -> None:
        from selfsup.pretext.text_tokenizer import TextTokenizer

        if state and state.get("tokenizer"):
            self.tokenizer = TextTokenizer.from_json(state["tokenizer"])

    def lr_layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: 0 embeddings, i + 1 for block i, depth + 1 the final norm."""
        name = name.removeprefix("model.")
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return 0 if name.startswith(("tok_embed", "pos_embed", "embed_norm")) else self.depth + 1

    # ---- forward -----------------------------------------------------------------------

    def embed(self, ids: Tensor) -> Tensor:
        """Token plus position embeddings (B, L, D), before the blocks."""
        n = ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence of {n} tokens is longer than the encoder's {self.max_len} positions "
                             "(backbone.max_len)")
        x = self.model.tok_embed(ids)
        if self.model.pos_embed is not None:
            x = x + self.model.pos_embed[:n].to(x.dtype)
        return self.model.drop(self.model.embed_norm(x))

    def tokens(self, ids: Tensor, attention_mask: Tensor | None = None, *, causal: bool = False,
               inputs: Tensor | None = None, return_layers: bool = False
               ) -> Tensor | tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Hidden states (B, L, D) of token ids (B, L), after the final norm (pre-LN) or the last
        block (post-LN).

        ``attention_mask`` (B, L), 1 for real tokens: padding is never attended to (with
        ``causal``, right padding needs no mask). ``inputs``: embeddings to use instead of
        ``embed(ids)`` (methods that edit them). ``return_layers``: also every block's (output,
        MLP output) pair."""
        x = self.embed(ids) if inputs is None else inputs
        n = x.shape[1]
        mask = None
        if attention_mask is not None and not causal and not bool(attention_mask.all()):
            mask = attention_mask[:, None, None, :].bool()
        rope = (self.rope_cos[:n].to(x.dtype), self.rope_sin[:n].to(x.dtype)) if self.pos_embed_type == "rotary" else None
        layers = []
        for block in self.model.blocks:
            x, ffn = block(x, mask, causal, rope)
            if return_layers:
                layers.append((x, ffn))
        x = self.model.norm(x)
        return (x, layers) if return_layers else x

    def pool_tokens(self, h: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, D) of hidden states: the first token (``pool: cls``) or the mean over real tokens."""
        if self.pool == "cls":
            return h[:, 0]
        if attention_mask is None:
            return h.mean(1)
        w = attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1).clamp_min(1.0)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        return self.pool_tokens(self.tokens(ids, attention_mask, causal=causal), attention_mask)

    def forward_features(self, ids: Tensor) -> Tensor:
        return self.tokens(ids)


@register_backbone("text_tiny", modality="text")
@register_backbone("text_mini", modality="text")
@register_backbone("text_small", modality="text")
@register_backbone("text_base", modality="text")
def build_text_encoder(cfg: BackboneConfig) -> TextEncoder:
    if cfg.vocab_size is None:
        raise ConfigError(f"backbone {cfg.name}: backbone.vocab_size is not set; it comes from the tokenizer "
                          "(data.tokenizer), which a text run resolves before building the encoder")
    dim, depth, heads = TEXT_SIZES[cfg.name]
    dim, depth, heads = cfg.embed_dim or dim, cfg.depth or depth, cfg.num_heads or heads
    if dim % heads:
        raise ConfigError(f"backbone.embed_dim={dim} is not divisible by backbone.num_heads={heads}")
    tokenizer = None
    if cfg.tokenizer:
        from pathlib import Path

        from selfsup.pretext.text_tokenizer import load_tokenizer

        if Path(cfg.tokenizer).expanduser().exists():  # else: a checkpoint's state brings it
            tokenizer = load_tokenizer(cfg.tokenizer)
    return TextEncoder(vocab_size=cfg.vocab_size, max_len=cfg.max_len or 512, embed_dim=dim, depth=depth,
                       num_heads=heads, norm=cfg.norm or "pre", pos_embed=cfg.pos_embed, pool=cfg.pool if cfg.pool == "cls" else "mean",
                       bias=cfg.bias, dropout=cfg.dropout, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------
# Hugging Face transformers names


def hf_export(encoder: TextEncoder, causal: bool) -> tuple[dict[str, Tensor], dict] | str:
    """(state dict, config.json dict) of ``encoder`` as ``GPT2Model`` (pre-LN, trained causally) or
    ``BertModel`` (post-LN, bidirectional), both with learned positions; else a sentence saying
    why no ``transformers`` architecture computes the same function."""
    if encoder.pos_embed_type != "learned":
        return (f"{encoder.pos_embed_type} positions: GPT-2 and BERT learn a position table, so "
                "transformers has no architecture with these exact weights' layout")
    if encoder.norm_type == "pre" and not causal:
        return ("a pre-LayerNorm encoder trained bidirectionally: GPT-2 (pre-LN) always attends causally and "
                "BERT is post-LN; train with backbone.norm=post for a BertModel export")
    if encoder.norm_type == "post" and causal:
        return "a post-LayerNorm encoder trained causally has no transformers equivalent (BERT is bidirectional)"
    m, d, depth = encoder.model, encoder.embed_dim, encoder.depth

    def w(t: Tensor) -> Tensor:
        return t.detach().float().contiguous().clone()

    def b(norm_or_linear: nn.Module, size: int) -> Tensor:
        bias = getattr(norm_or_linear, "bias", None)
        return w(bias) if bias is not None else torch.zeros(size)

    out: dict[str, Tensor] = {}
    if causal:  # GPT-2: Conv1D weights are stored (in, out)
        out["wte.weight"], out["wpe.weight"] = w(m.tok_embed.weight), w(m.pos_embed)
        for i, blk in enumerate(m.blocks):
            p = f"h.{i}."
            out[p + "ln_1.weight"], out[p + "ln_1.bias"] = w(blk.norm1.weight), b(blk.norm1, d)
            out[p + "attn.c_attn.weight"], out[p + "attn.c_attn.bias"] = w(blk.qkv.weight.T), b(blk.qkv, 3 * d)
            out[p + "attn.c_proj.weight"], out[p + "attn.c_proj.bias"] = w(blk.proj.weight.T), b(blk.proj, d)
            out[p + "ln_2.weight"], out[p + "ln_2.bias"] = w(blk.norm2.weight), b(blk.norm2, d)
            out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = w(blk.fc1.weight.T), b(blk.fc1, 4 * d)
            out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = w(blk.fc2.weight.T), b(blk.fc2, d)
        out["ln_f.weight"], out["ln_f.bias"] = w(m.norm.weight), b(m.norm, d)
        config = {"architectures": ["GPT2Model"], "model_type": "gpt2", "vocab_size": encoder.vocab_size,
                  "n_positions": encoder.max_len, "n_embd": d, "n_layer": depth, "n_head": encoder.num_heads,
                  "n_inner": 4 * d, "activation_function": "gelu", "layer_norm_epsilon": 1e-5,
                  "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
                  "tie_word_embeddings": True}
        return out, config
    p = "embeddings."
    out[p + "word_embeddings.weight"], out[p + "position_embeddings.weight"] = w(m.tok_embed.weight), w(m.pos_embed)
    out[p + "token_type_embeddings.weight"] = torch.zeros(1, d)  # no segment embeddings: type 0 adds nothing
    out[p + "LayerNorm.weight"], out[p + "LayerNorm.bias"] = w(m.embed_norm.weight), b(m.embed_norm, d)
    for i, blk in enumerate(m.blocks):
        p = f"encoder.layer.{i}."
        q, k, v = blk.qkv.weight.chunk(3)
        qkv_bias = b(blk.qkv, 3 * d).chunk(3)
        for name, weight, bias in zip(("query", "key", "value"), (q, k, v), qkv_bias):
            out[p + f"attention.self.{name}.weight"], out[p + f"attention.self.{name}.bias"] = w(weight), w(bias)
        out[p + "attention.output.dense.weight"], out[p + "attention.output.dense.bias"] = w(blk.proj.weight), b(blk.proj, d)
        out[p + "attention.output.LayerNorm.weight"] = w(blk.norm1.weight)
        out[p + "attention.output.LayerNorm.bias"] = b(blk.norm1, d)
        out[p + "intermediate.dense.weight"], out[p + "intermediate.dense.bias"] = w(blk.fc1.weight), b(blk.fc1, 4 * d)
        out[p + "output.dense.weight"], out[p + "output.dense.bias"] = w(blk.fc2.weight), b(blk.fc2, d)
        out[p + "output.LayerNorm.weight"], out[p + "output.LayerNorm.bias"] = w(blk.norm2.weight), b(blk.norm2, d)
    config = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": encoder.vocab_size,
              "max_position_embeddings": encoder.max_len, "hidden_size": d, "num_hidden_layers": depth,
              "num_attention_heads": encoder.num_heads, "intermediate_size": 4 * d, "hidden_act": "gelu",
              "layer_norm_eps": 1e-12, "type_vocab_size": 1, "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, "position_embedding_type": "absolute"}
    if encoder.tokenizer is not None:
        config["pad_token_id"] = encoder.tokenizer.pad_id
    return out, config
