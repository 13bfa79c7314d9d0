"""Text tokenizers: trained by the library on the user's corpus with Hugging Face ``tokenizers``,
or read from an existing ``tokenizer.json``.

Three kinds, one per family of methods:

- ``char``: one token per character, as nanoGPT's ``shakespeare_char`` (a word-level model over a
  split into single characters, so it saves as a standard ``tokenizer.json``);
- ``bpe``: byte-level BPE (GPT-2, RoBERTa; every byte sequence encodes, no unknown tokens), for
  causal LMs and T5-style span corruption;
- ``wordpiece``: BERT's WordPiece with BERT's normalizer (lower case, accents stripped), for MLM.

Every trained tokenizer starts its vocabulary with the same special tokens, ``[PAD] [UNK] [CLS]
[SEP] [MASK]`` (ids 0-4), then the learned tokens, then any sentinels a method asks for
(``<extra_id_0>`` ...; T5's span corruption). Methods read the ids by role (``pad_id``,
``mask_id``, ``sep_id``, ...), so a ``tokenizer.json`` from elsewhere works when it names its
special tokens in one of the usual ways (``<pad>``, ``<mask>``, ``</s>``, ``<|endoftext|>`` ...).
``[SEP]`` also marks document boundaries in packed sequences.

The tokenizer travels with the model: the text encoder keeps its JSON as extra state, so a
checkpoint holds it and ``selfsup export`` writes it beside the weights as ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from selfsup.errors import ConfigError

KINDS = ("char", "bpe", "wordpiece")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# role -> the names that role goes by in the tokenizers we train and in common published ones
ROLES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "cls": ("[CLS]", "<s>", "<cls>", "<|startoftext|>"),
    "sep": ("[SEP]", "</s>", "<sep>", "<|endoftext|>"),
    "mask": ("[MASK]", "<mask>"),
}


def sentinel(i: int) -> str:
    """T5's name of the i-th span sentinel."""
    return f"<extra_id_{i}>"


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids of its special tokens by role.

    ``encode`` never adds special tokens (packing and methods place them); ``kind`` is ``char``,
    ``bpe``, ``wordpiece`` or ``file`` (read from a user's tokenizer.json)."""

    def __init__(self, tokenizer, kind: str = "file") -> None:
        self.tokenizer = tokenizer
        self.kind = kind
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._ids = {role: next((vocab[n] for n in names if n in vocab), None) for role, names in ROLES.items()}
        self.special_ids = sorted({i for i, t in _added_tokens(tokenizer).items() if t.special} |
                                  {i for i in self._ids.values() if i is not None})

    # ---- special tokens by role ------------------------------------------------------------

    @property
    def pad_id(self) -> int:
        return self._role("pad", fallback="sep")

    @property
    def sep_id(self) -> int:
        return self._role("sep")

    @property
    def cls_id(self) -> int:
        return self._role("cls", fallback="sep")

    @property
    def mask_id(self) -> int:
        return self._role("mask")

    def _role(self, role: str, fallback: str | None = None) -> int:
        found = self._ids[role] if self._ids[role] is not None else (self._ids[fallback] if fallback else None)
        if found is None:
            raise ConfigError(f"the tokenizer has no {role} token (one of {', '.join(ROLES[role])}); "
                              "train one with data.tokenizer=char|bpe|wordpiece, which adds them")
        return found

    def has(self, role: str) -> bool:
        return self._ids[role] is not None

    def sentinel_ids(self, count: int) -> torch.Tensor:
        """The ids of ``<extra_id_0>`` ... ``<extra_id_{count-1}>`` (T5's sentinels)."""
        ids = [self.tokenizer.token_to_id(sentinel(i)) for i in range(count)]
        if any(i is None for i in ids):
            have = sum(i is not None for i in ids)
            raise ConfigError(f"span corruption needs {count} sentinel tokens <extra_id_N>; the tokenizer has {have}")
        return torch.tensor(ids, dtype=torch.int64)

    # ---- text <-> ids ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self.kind == "char":
            return self._encode_chars(text).tolist()
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of many texts at once (the Rust side spreads them over the cores)."""
        if self.kind == "char":
            return [self._encode_chars(t).tolist() for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _encode_chars(self, text: str):
        """A character vocabulary's ids by table lookup: the same ids as the tokenizer's own encode
        (one pre-token per character), about 300x faster on a long text."""
        import numpy as np

        if not hasattr(self, "_char_table"):
            vocab = self.tokenizer.get_vocab(with_added_tokens=False)
            chars = sorted((ord(t), i) for t, i in vocab.items() if len(t) == 1)
            self._char_table = (np.array([c for c, _ in chars], dtype=np.int64),
                                np.array([i for _, i in chars], dtype=np.int64))
        codes, ids = self._char_table
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        where = np.searchsorted(codes, points).clip(0, max(0, len(codes) - 1))
        found = codes[where] == points if len(codes) else np.zeros(len(points), dtype=bool)
        return np.where(found, ids[where] if len(ids) else 0, self._ids["unk"] if self._ids["unk"] is not None else 0)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def token(self, i: int) -> str:
        return self.tokenizer.id_to_token(int(i)) or "?"

    def word_starts(self) -> torch.Tensor:
        """(vocab_size,) bool: which tokens begin a word, for whole-word masking. WordPiece marks
        continuations with ``##`` (BERT's rule); byte-level BPE marks a word's first piece with a
        leading space (``Ġ``), so there a word is a space-led run (punctuation joins the word before
        it). Characters have no word structure: refused."""
        if self.kind == "char":
            raise ConfigError("whole-word masking needs a word-piece tokenizer (data.tokenizer=wordpiece or bpe); "
                              "a character tokenizer has no words")
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        byte_level = self.kind == "bpe" or any(t.startswith("\u0120") for t in vocab)
        starts = torch.ones(self.vocab_size, dtype=torch.bool)
        special = set(self.special_ids)
        for tok, i in vocab.items():
            if i not in special:
                starts[i] = tok.startswith("\u0120") if byte_level else not tok.startswith("##")
        return starts

    # ---- saving -----------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": json.loads(self.tokenizer.to_str())})

    @classmethod
    def from_json(cls, text: str) -> TextTokenizer:
        from tokenizers import Tokenizer

        data = json.loads(text)
        if "kind" in data and "tokenizer" in data:  # ours: the kind beside the standard JSON
            return cls(Tokenizer.from_str(json.dumps(data["tokenizer"])), data["kind"])
        return cls(Tokenizer.from_str(text), _kind_of(data))

    def save(self, path: str | Path) -> Path:
        """Write the standard ``tokenizer.json`` (loadable by ``tokenizers`` and ``transformers``), atomically."""
        from selfsup.checkpoint import write_text_atomic

        path = Path(path)
        write_text_atomic(path, self.tokenizer.to_str(pretty=True))
        return path

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.kind} tokenizer, {self.vocab_size} tokens"


def _kind_of(data: dict) -> str:
    """Which of our kinds a standard tokenizer.json is, read from its model and pre-tokenizer (a
    tokenizer from elsewhere that matches none is ``file``)."""
    model = (data.get("model") or {}).get("type")
    pre = json.dumps(data.get("pre_tokenizer") or {})
    if model == "WordLevel" and "Split" in pre:
        return "char"
    if model == "BPE" and "ByteLevel" in pre:
        return "bpe"
    if model == "WordPiece":
        return "wordpiece"
    return "file"


def _added_tokens(tokenizer) -> dict:
    """id -> AddedToken of the tokenizer's added (special) tokens."""
    try:
        return dict(tokenizer.get_added_tokens_decoder())
    except AttributeError:  # tokenizers < 0.15
        return {}


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A ``tokenizer.json`` (ours or any Hugging Face one), with a one-line error when unreadable."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"tokenizer file {path} not found (data.tokenizer takes char, bpe, wordpiece or a "
                          "tokenizer.json)")
    try:
        return TextTokenizer.from_json(path.read_text())
    except Exception as err:  # tokenizers raises its own Exception subclass on malformed JSON
        raise ConfigError(f"{path} is not a tokenizers JSON file: {err}") from None


def train_tokenizer(kind: str, texts: Iterator[str] | Iterable[str], vocab_size: int = 8192,
                    sentinels: int = 0) -> TextTokenizer:
    """Train a ``kind`` tokenizer on ``texts`` (an iterable of strings, read once), with the special
    tokens first and ``sentinels`` T5 sentinels last. ``vocab_size`` bounds bpe and wordpiece; a
    character vocabulary is as large as the characters seen."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind not in KINDS:
        raise ConfigError(f"data.tokenizer={kind!r}: must be one of {', '.join(KINDS)} or a path to a tokenizer.json")
    specials = list(SPECIALS)
    if kind == "char":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=1 << 30, min_frequency=1, special_tokens=specials,
                                            show_progress=False)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if sentinels:
        tok.add_special_tokens([sentinel(i) for i in range(sentinels)])
    return TextTokenizer(tok, kind)
