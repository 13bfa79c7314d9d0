"""The text modality: batches of token ids (``tokens`` (B, L) int64, with an ``attention_mask``
when padded), read from text, JSONL, TSV and CSV files and folders (``selfsup.data.text``),
encoded by the transformers of ``selfsup.backbones.text``.

A text run fixes its tokenizer before the encoder is built (``configure``): ``data.tokenizer``
names a kind (``char``, ``bpe``, ``wordpiece``), trained once on the training split and cached
(keyed by the files and the settings), or a ``tokenizer.json``; the default is the method's
(``TextMethod.default_tokenizer``). The tokenizer's file and vocabulary size go into the run's
config (``backbone.tokenizer``, ``backbone.vocab_size``) and the tokenizer itself into every
checkpoint, with the encoder.

:class:`TextMethod` is the base class of every text method: how an evaluation batch is encoded
(mean over the real tokens, or the first token with ``backbone.pool: cls``; causal for causal
LMs), and the language-model scores behind ``selfsup eval perplexity``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from selfsup.core.method import Method
from selfsup.errors import ConfigError
from selfsup.registry import Modality, check_batch, get_method, register_modality

log = logging.getLogger("selfsup")

BATCH_KEY = "tokens"


class TextMethod(Method):
    """A Method on token ids. Training batches are blocks of ``data.seq_len + 1`` tokens
    (``inputs`` gives the first ``seq_len`` to methods that do not predict the next token);
    evaluation batches are padded examples with an ``attention_mask``."""

    modalities: ClassVar[tuple[str, ...]] = ("text",)
    default_tokenizer: ClassVar[str] = "bpe"
    causal: ClassVar[bool] = False  # how the encoder attends (GPT: causal), in training and in encode
    figures: ClassVar[tuple[str, ...]] = ()  # "predictions": it implements predictions(texts)
    unit: ClassVar[str] = "tokens"
    # it scores held-out tokens (lm_scores): pretraining ends with its held-out loss and perplexity
    language_model: ClassVar[bool] = False

    def __init__(self, cfg: Any, backbone: nn.Module, augment: Any = None) -> None:
        super().__init__(cfg, backbone, augment)
        from selfsup.backbones.text import TextEncoder

        if not isinstance(backbone, TextEncoder):
            raise ConfigError(f"{self.name} needs a text encoder (text_tiny ... text_base), got {type(backbone).__name__}")

    @classmethod
    def sentinels(cls, method_cfg: Any) -> int:
        """Extra special tokens the method needs in the vocabulary (T5's sentinels)."""
        return 0

    @property
    def tokenizer(self):
        tok = self.backbone.tokenizer
        if tok is None:
            raise ConfigError(f"{self.name}: the encoder has no tokenizer (set data.tokenizer, or load a checkpoint)")
        return tok

    @staticmethod
    def inputs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The first ``seq_len`` tokens of each training block (the last is only a next-token target)."""
        return batch["tokens"][:, :-1]

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens trained on: ``seq_len`` per block."""
        return int(self.inputs(batch).numel())

    def check(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(batch, torch.Tensor):
            return {BATCH_KEY: batch}
        if BATCH_KEY not in batch:
            check_batch(self.name, self.modalities, batch)
        return batch

    def preprocess(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.check(batch)[BATCH_KEY]

    def encode(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) sequence features: the encoder run as in training (causal for causal LMs), pooled."""
        return self.encoder(tokens, attention_mask, causal=self.causal)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = self.check(batch)
        return self.encode(batch[BATCH_KEY], batch.get("attention_mask")).float()

    def lm_scores(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Language-model scores of a training-style batch of blocks, summed: ``nll`` (nats),
        ``correct`` (top-1 hits) and ``count`` (predicted tokens); ``selfsup eval perplexity``
        turns them into loss, perplexity and accuracy. Deterministic for a given batch."""
        raise NotImplementedError(f"{self.name} is not a language model (no perplexity to measure)")

    def predictions(self, texts: list[str]) -> list[str]:
        """One line per text showing what the model predicts on it (the report's "predictions"
        figure): masked tokens and their top guesses, or a continuation. Methods declaring the
        figure implement it."""
        raise NotImplementedError(f"{self.name} does not declare the 'predictions' figure")


# --------------------------------------------------------------------------------------
# the tokenizer of a run


def resolve_tokenizer(cfg: Any, kind: str, sentinels: int = 0):
    """(tokenizer, its file) for a run: ``data.tokenizer`` as a path, or a kind trained on the
    training split and cached (keyed by the split's files, the kind, the vocabulary size and the
    sentinels)."""
    from selfsup.data.text import SplitFiles, _files_state, corpus_sample, split_files, text_cache_dir
    from selfsup.pretext.text_tokenizer import KINDS, load_tokenizer, sentinel, train_tokenizer

    spec = cfg.data.tokenizer or kind
    if spec not in KINDS:
        tok = load_tokenizer(spec)
        if sentinels and any(tok.tokenizer.token_to_id(sentinel(i)) is None for i in range(sentinels)):
            tok.tokenizer.add_special_tokens([sentinel(i) for i in range(sentinels)])
            tok = type(tok)(tok.tokenizer, tok.kind)
            path = text_cache_dir() / f"tokenizer-{tok.fingerprint}.json"
            return tok, tok.save(path)
        return tok, spec
    files: SplitFiles = split_files(cfg.data.source, cfg.data.train_split)
    key = hashlib.sha256(json.dumps([_files_state(files), spec, cfg.data.tokenizer_vocab, sentinels,
                                     cfg.data.text_column]).encode()).hexdigest()[:16]
    path = text_cache_dir() / f"tokenizer-{spec}-{key}.json"
    if path.is_file():
        return load_tokenizer(path), path
    t0 = time.perf_counter()
    tok = train_tokenizer(spec, corpus_sample(files, cfg.data), cfg.data.tokenizer_vocab, sentinels)
    tok.save(path)
    log.info("trained a %s on %s in %.1f s", tok.describe(), files.description, time.perf_counter() - t0)
    return tok, path


def _configure(cfg: Any) -> Any:
    """Fix the tokenizer (and so ``backbone.vocab_size``) and the position count before the encoder is
    built; a config that has them (a resumed or loaded run) is kept as it is."""
    if cfg.backbone.vocab_size is not None and cfg.backbone.tokenizer:
        return cfg
    method = get_method(cfg.method.name)
    tok, path = resolve_tokenizer(cfg, method.default_tokenizer, method.sentinels(cfg.method))
    backbone = replace(cfg.backbone, vocab_size=tok.vocab_size, tokenizer=str(path),
                       max_len=cfg.backbone.max_len or cfg.data.seq_len + 1)
    return replace(cfg, backbone=backbone)


def _claims(source: str) -> bool:
    from selfsup.data.text import is_text_source

    return is_text_source(source)


def _open(cfg: Any, split: str, evaluation: bool = False) -> Any:
    """Token blocks of a split for training, labeled examples for evaluation (data/text.py)."""
    from selfsup.data.modes import OpenedData
    from selfsup.data.text import TokenBlocks, split_files, text_examples, token_array
    from selfsup.pretext.text_tokenizer import load_tokenizer

    if not cfg.backbone.tokenizer:
        raise ConfigError("a text run's tokenizer is fixed before its data is read (selfsup.core.build.resolve_config)")
    tok = load_tokenizer(cfg.backbone.tokenizer)
    data = cfg.data
    if evaluation:
        examples = text_examples(data.source, split, data, tok)
        return OpenedData(examples, "memory", f"{len(examples)} labeled texts of {examples.name}")
    files = split_files(data.source, split)
    tokens = token_array(files, tok, data)
    blocks = TokenBlocks(tokens, data.seq_len, name=files.description,
                         fingerprint=f"{tok.fingerprint}:{len(tokens)}")
    return OpenedData(blocks, "memory", f"{len(tokens):,} tokens of {files.description} ({tok.describe()}), "
                                        f"{len(blocks):,} blocks of {data.seq_len} + 1, memory-mapped from "
                                        f"the cache")


TEXT = register_modality(Modality("text", (BATCH_KEY, "attention_mask"), _claims, _open,
                                  "token ids (B, L); text/JSONL/TSV/CSV files and folders, embedded-text",
                                  configure=_configure))

__all__ = ["TEXT", "TextMethod", "resolve_tokenizer"]
