"""Text data: corpora packed into token blocks for pretraining, labeled examples for evaluation.

Sources (``data.source``):

- ``embedded-text``: tiny-shakespeare (1.1 MB, public domain), shipped inside the package; the
  labeled task is which of the 10 most frequent speakers says a speech (``speaker_examples``);
- a text file (``.txt``, ``.md``, ``.raw``, ``.tokens``): one document;
- a table file (``.jsonl``, ``.tsv``, ``.csv``): one document per row, its text in
  ``data.text_column`` (default ``text`` / ``sentence``, else the first column) and an optional
  label in ``data.label_column`` (default ``label``, else a TSV/CSV's last column);
- a folder: split files (``train.txt``, ``valid.tsv``, ``test.jsonl``, ...) or split subfolders of
  text files; without them all its text files, in sorted order.

Splits: a folder's split files answer ``train``; ``val`` / ``valid`` / ``validation`` / ``dev``
are one another's aliases. A single file (and a folder without split files) is cut as nanoGPT cuts
tiny-shakespeare: the first 90% of its bytes (rows for a table, files for a folder) is ``train``,
the rest answers every other split.

Pretraining reads a split as ``TokenBlocks``: every document tokenized, a ``[SEP]`` after each
(the document boundary), all concatenated into one token array on disk (a memory map, so a
corpus larger than memory trains) and cut into blocks of ``seq_len + 1`` tokens: next-token
methods predict ``seq_len`` targets, the others read the first ``seq_len``. Consecutive blocks
share their boundary token, so each token is predicted once per epoch; every epoch shifts the
block grid by a random phase, so the windows differ from epoch to epoch (as nanoGPT's random
offsets do) while an epoch stays a partition. The token array is cached, keyed by the files'
state and the tokenizer, under the selfsup cache folder.

Evaluation reads a split as ``TextExamples``: one labeled example per row (or speech), truncated to
``seq_len`` and padded per batch, with an ``attention_mask``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selfsup.errors import DataError

log = logging.getLogger("selfsup")

EMBEDDED_TEXT = "embedded-text"
EMBEDDED_TEXT_FILE = Path(__file__).resolve().parent / "embedded" / "tinyshakespeare.txt.gz"
PLAIN_SUFFIXES = (".txt", ".text", ".md", ".raw", ".tokens")
TABLE_SUFFIXES = (".jsonl", ".tsv", ".csv")
TEXT_SUFFIXES = PLAIN_SUFFIXES + TABLE_SUFFIXES
SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation", "dev"),
                 "test": ("test",)}
TRAIN_FRACTION = 0.9  # nanoGPT's cut of tiny-shakespeare
TOKENIZE_CHUNK = 1 << 20  # characters per tokenizer call when streaming a large file
SPEAKERS = 10  # the embedded set's labeled task: the most frequent speakers


def is_text_source(source: str) -> bool:
    """Whether ``source`` names text: ``embedded-text``, a text or table file, or a folder holding
    such files (and no images)."""
    if source.strip().lower() == EMBEDDED_TEXT:
        return True
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix.lower() in TEXT_SUFFIXES
    if path.is_dir():
        return _folder_has_text(path)
    return False


def _folder_has_text(path: Path) -> bool:
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    names = [e.name.lower() for e in entries if e.is_file()]
    if any(n.endswith(TEXT_SUFFIXES) for n in names):
        return True
    subs = [e for e in entries if e.is_dir() and e.name in {a for v in SPLIT_ALIASES.values() for a in v}]
    return any(_folder_has_text(Path(s.path)) for s in subs)


# --------------------------------------------------------------------------------------
# where a split's documents are


@dataclass(frozen=True)
class SplitFiles:
    """The files of one split and, for a source cut 90/10, which part of them (``part``: None for
    the whole, ``train`` for the first 90%, ``held`` for the rest)."""

    files: tuple[Path, ...]
    part: str | None
    description: str

    @property
    def table(self) -> bool:
        return any(f.suffix.lower() in TABLE_SUFFIXES for f in self.files)


def split_files(source: str, split: str) -> SplitFiles:
    """The files (and part of them) that hold ``split`` of ``source``; see the module docstring."""
    part = "train" if split == "train" else "held"
    if source.strip().lower() == EMBEDDED_TEXT:
        return SplitFiles((EMBEDDED_TEXT_FILE,), part, f"tiny-shakespeare ({'first 90%' if part == 'train' else 'last 10%'})")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"text data {source} not found (a text/JSONL/TSV/CSV file, a folder of them, or "
                        f"{EMBEDDED_TEXT})")
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise DataError(f"{path} is not a text file this reader knows ({', '.join(TEXT_SUFFIXES)})")
        return SplitFiles((path,), part, f"{path.name} ({'first 90%' if part == 'train' else 'last 10%'})")
    names = SPLIT_ALIASES.get(split, SPLIT_ALIASES["val"] if split in SPLIT_ALIASES["val"] else (split,))
    for name in names:
        for suffix in TEXT_SUFFIXES:
            if (path / f"{name}{suffix}").is_file():
                return SplitFiles((path / f"{name}{suffix}",), None, f"{path.name}/{name}{suffix}")
        if (path / name).is_dir():
            files = _text_files(path / name)
            if files:
                return SplitFiles(files, None, f"{path.name}/{name}/ ({len(files)} files)")
    has_splits = any((path / f"{a}{s}").is_file() or (path / a).is_dir()
                     for v in SPLIT_ALIASES.values() for a in v for s in TEXT_SUFFIXES)
    if has_splits:
        raise DataError(f"{path} has split files but no {split!r} split (looked for {', '.join(names)} "
                        f"with {', '.join(TEXT_SUFFIXES)}); pass data.train_split / data.test_split or --test-split")
    files = _text_files(path)
    if not files:
        raise DataError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    if len(files) == 1:
        return SplitFiles(files, part, f"{path.name}/{files[0].name} ({'first 90%' if part == 'train' else 'last 10%'})")
    cut = max(1, min(len(files) - 1, round(len(files) * TRAIN_FRACTION)))
    chosen = files[:cut] if part == "train" else files[cut:]
    return SplitFiles(chosen, None, f"{path.name}/ ({len(chosen)} of {len(files)} files, "
                                    f"{'the first 90%' if part == 'train' else 'the held-out 10%'})")


def _text_files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                        and not any(part.startswith(".") for part in p.relative_to(folder).parts)))


# --------------------------------------------------------------------------------------
# reading documents


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _read_plain(path: Path, part: str | None) -> Iterator[str]:
    """The text of a plain file (or of its first 90% / last 10% of bytes), in chunks of whole lines."""
    if path.suffix == ".gz":  # small (the embedded set): read whole
        with gzip.open(path, "rb") as fh:
            data = fh.read()
        lo, hi = _part_bounds(len(data), part, data)
        yield data[lo:hi].decode("utf-8", errors="replace")
        return
    size = path.stat().st_size
    with open(path, "rb") as fh:
        lo, hi = _part_bounds(size, part, None, fh)
        fh.seek(lo)
        left, rest = hi - lo, b""
        while left > 0:
            chunk = fh.read(min(TOKENIZE_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            chunk = rest + chunk
            cut = chunk.rfind(b"\n") + 1 if left > 0 else len(chunk)
            if cut <= 0:  # a line longer than the chunk: carry it on
                rest = chunk
                continue
            rest = chunk[cut:]
            yield chunk[:cut].decode("utf-8", errors="replace")
        if rest:
            yield rest.decode("utf-8", errors="replace")


def _part_bounds(size: int, part: str | None, data: bytes | None, fh=None) -> tuple[int, int]:
    """Byte range of ``part``: the cut at 90% of the bytes, moved forward to a UTF-8 character start."""
    if part is None:
        return 0, size
    cut = int(size * TRAIN_FRACTION)
    for _ in range(4):  # a UTF-8 continuation byte is 0b10xxxxxx
        if data is not None:
            byte = data[cut:cut + 1]
        else:
            fh.seek(cut)
            byte = fh.read(1)
        if not byte or (byte[0] & 0xC0) != 0x80:
            break
        cut += 1
    return (0, cut) if part == "train" else (cut, size)


@dataclass
class Row:
    text: str
    label: str | None


def read_table(path: Path, text_column: str | None = None, label_column: str | None = None) -> list[Row]:
    """The rows of a JSONL/TSV/CSV file as (text, label or None); a header line is recognized by
    its column names (``text``, ``sentence``, ``label``) or by a non-numeric label above numeric ones."""
    suffix = path.suffix.lower()
    rows: list[Row] = []
    if suffix == ".jsonl":
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno} is not JSON: {err.msg}") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: each line must be a JSON object with a text field")
                key = text_column or next((k for k in ("text", "sentence", "content") if k in obj), None)
                if key is None or key not in obj:
                    raise DataError(f"{path}:{lineno} has no {text_column or 'text'!r} field (fields: "
                                    f"{', '.join(obj)}); set data.text_column")
                lab = obj.get(label_column or "label")
                rows.append(Row(str(obj[key]), None if lab is None else str(lab)))
        return rows
    delimiter = "\t" if suffix == ".tsv" else ","
    with _open_text(path) as fh:
        table = [r for r in csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t"
                                       else csv.QUOTE_MINIMAL) if r]
    if not table:
        return rows
    header = [c.strip().lower() for c in table[0]]
    named = any(h in ("text", "sentence", "label", "content") for h in header)
    if named or (text_column is not None and text_column in header):
        body = table[1:]
        ti = header.index(text_column) if text_column in header else next(
            (header.index(h) for h in ("text", "sentence", "content") if h in header), 0)
        li = header.index(label_column) if label_column in header else (header.index("label") if "label" in header else None)
    else:
        body, ti = table, int(text_column) if text_column and text_column.isdigit() else 0
        li = int(label_column) if label_column and label_column.isdigit() else (len(table[0]) - 1 if len(table[0]) > 1 else None)
    for r in body:
        if ti >= len(r):
            continue
        rows.append(Row(r[ti], r[li] if li is not None and li < len(r) and li != ti else None))
    return rows


def _table_part(rows: list, part: str | None) -> list:
    if part is None:
        return rows
    cut = int(len(rows) * TRAIN_FRACTION)
    return rows[:cut] if part == "train" else rows[cut:]


def documents(files: SplitFiles, data) -> Iterator[str]:
    """Every document of a split, in order: a plain file's text in chunks of lines (a document
    boundary only at the file's end, marked by an empty string), a table's rows one by one."""
    for path in files.files:
        if path.suffix.lower() in TABLE_SUFFIXES:
            for row in _table_part(read_table(path, data.text_column, data.label_column), files.part):
                yield row.text
                yield ""
        else:
            yield from _read_plain(path, files.part)
            yield ""


# --------------------------------------------------------------------------------------
# pretraining: the token array and its blocks


def text_cache_dir() -> Path:
    from selfsup.data.cache import default_cache_dir

    return default_cache_dir() / "text"


def _files_state(files: SplitFiles, *extra) -> str:
    digest = hashlib.sha256()
    for f in files.files:
        st = f.stat()
        digest.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
    digest.update(json.dumps([files.part, *extra], default=str).encode())
    return digest.hexdigest()[:16]


def token_array(files: SplitFiles, tokenizer, data, *, progress: bool = True) -> np.ndarray:
    """The split's tokens as one array (a read-only memory map of the cached file), documents
    separated by the tokenizer's ``[SEP]``; built once per (files, tokenizer), atomically."""
    key = _files_state(files, tokenizer.fingerprint, data.text_column, data.label_column)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    path = text_cache_dir() / f"tokens-{key}.{np.dtype(dtype).name}"
    if not path.is_file():
        _write_tokens(files, tokenizer, data, path, dtype, progress)
    return np.memmap(path, dtype=dtype, mode="r")


def _write_tokens(files: SplitFiles, tokenizer, data, path: Path, dtype, progress: bool) -> None:
    """Tokenize the split's documents into ``path`` (a temp file renamed at the end: an interrupted
    build leaves no partial array behind)."""
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    total = sum(f.stat().st_size for f in files.files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {files.description}",
               disable=not progress or total < 16 << 20 or not sys.stderr.isatty())
    sep = np.array([tokenizer.sep_id], dtype=dtype).tobytes()
    try:
        with open(tmp, "wb") as out:
            for f in files.files:
                if f.suffix.lower() in TABLE_SUFFIXES:  # a document per row, encoded in batches
                    rows = [r.text for r in _table_part(read_table(f, data.text_column, data.label_column), files.part)]
                    for lo in range(0, len(rows), 4096):
                        for ids in tokenizer.encode_batch(rows[lo:lo + 4096]):
                            out.write(np.asarray(ids, dtype=dtype).tobytes() + sep)
                    bar.update(f.stat().st_size)
                    continue
                for chunk in _read_plain(f, files.part):  # one document, in chunks of whole lines
                    out.write(np.asarray(tokenizer.encode(chunk), dtype=dtype).tobytes())
                    bar.update(len(chunk))
                out.write(sep)
        os.replace(tmp, path)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)


class TokenBlocks:
    """Blocks of ``seq_len + 1`` tokens of a token array, for pretraining (see the module docstring).

    A sample index encodes (phase, block): ``phase * n + block``, so an epoch's order, drawn by
    ``epoch_order`` from the loader's (seed, epoch) generator, carries its grid shift and resumes
    exactly; an index below ``n`` is a block on the unshifted grid (evaluation)."""

    has_labels = False
    classes: list[str] = []

    def __init__(self, tokens: np.ndarray, seq_len: int, *, name: str = "", blocks: torch.Tensor | None = None,
                 fingerprint: str = "") -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        total = len(tokens) // seq_len - 1
        if total < 1:
            raise DataError(f"{name}: {len(tokens)} tokens make no block of data.seq_len={seq_len} + 1; "
                            "lower data.seq_len or use more text")
        self.blocks = torch.arange(total) if blocks is None else blocks
        self.name = name
        self.fingerprint = fingerprint
        self.skipped, self.skip_reasons = 0, {}

    def __len__(self) -> int:
        return len(self.blocks)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        n = len(self)
        phase = int(torch.randint(self.seq_len, (1,), generator=generator))
        return torch.randperm(n, generator=generator) + phase * n

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(self)
        phase, block = index // n, index % n
        starts = (self.blocks[block] * self.seq_len + phase).numpy()
        rows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        return {"tokens": torch.from_numpy(rows.astype(np.int64)), "index": index}

    def subset(self, keep: torch.Tensor, name: str) -> TokenBlocks:
        return TokenBlocks(self.tokens, self.seq_len, name=name, blocks=self.blocks[keep], fingerprint=self.fingerprint)

    @property
    def token_count(self) -> int:
        return int(len(self.tokens))


# --------------------------------------------------------------------------------------
# evaluation: labeled examples


class TextExamples:
    """Labeled texts tokenized once and held in memory (evaluation sets are small): batches of
    ``tokens`` padded to the batch's longest (at most ``seq_len``), ``attention_mask``, ``labels``."""

    def __init__(self, ids: list[list[int]], labels: list[int], classes: list[str], *, seq_len: int, pad_id: int,
                 name: str = "", fingerprint: str = "", texts: list[str] | None = None) -> None:
        self.lengths = torch.tensor([min(len(x), seq_len) for x in ids], dtype=torch.int64)
        self.flat = torch.tensor([t for x in ids for t in x[:seq_len]], dtype=torch.int64)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self.lengths.cumsum(0)])
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.classes = classes
        self.seq_len, self.pad_id = seq_len, pad_id
        self.name, self.fingerprint = name, fingerprint
        self.texts = texts
        self.skipped, self.skip_reasons = 0, {}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def has_labels(self) -> bool:
        return bool(self.classes) and len(self) > 0 and bool((self.labels >= 0).all())

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        lengths = self.lengths[index]
        width = max(1, int(lengths.max()) if len(index) else 1)
        pos = torch.arange(width)
        mask = pos[None, :] < lengths[:, None]
        src = (self.offsets[index][:, None] + pos[None, :]).clamp_max(max(0, len(self.flat) - 1))
        tokens = torch.where(mask, self.flat[src] if len(self.flat) else torch.zeros_like(src), self.pad_id)
        return {"tokens": tokens, "attention_mask": mask.to(torch.int64), "labels": self.labels[index], "index": index}

    def subset(self, keep: torch.Tensor, name: str) -> TextExamples:
        ids = [self.flat[self.offsets[i]:self.offsets[i + 1]].tolist() for i in keep.tolist()]
        texts = [self.texts[i] for i in keep.tolist()] if self.texts else None
        return TextExamples(ids, self.labels[keep].tolist(), self.classes, seq_len=self.seq_len, pad_id=self.pad_id,
                            name=name, fingerprint=f"{self.fingerprint}:{len(keep)}", texts=texts)


def speaker_examples(text: str, split: str, speakers: int = SPEAKERS) -> list[Row]:
    """The embedded set's labeled task: each speech of tiny-shakespeare (a ``NAME:`` line and the
    lines after it, up to a blank line) by one of the ``speakers`` most frequent speakers, labeled
    with its speaker; speeches said more than once ("My lord.") are left out. Every 5th speech of each speaker is ``test``, the rest ``train``; the plays
    run one after another, so a cut by position would leave other speakers on each side. The
    pretraining text contains these speeches (unlabeled), as a corpus usually contains its probe."""
    speeches = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Za-z' ]*:", lines[0]):
            speeches.append((lines[0][:-1], "\n".join(lines[1:])))
    repeated = {t for t, n in Counter(t for _, t in speeches).items() if n > 1}  # "My lord.": in both splits
    speeches = [(name, t) for name, t in speeches if t not in repeated]
    top = [name for name, _ in Counter(s for s, _ in speeches).most_common(speakers)]
    seen: Counter = Counter()
    rows = []
    for name, speech in speeches:
        if name not in top:
            continue
        is_test = seen[name] % 5 == 4
        seen[name] += 1
        if is_test == (split != "train"):
            rows.append(Row(speech, name))
    return rows


def labeled_rows(source: str, split: str, data) -> tuple[list[Row], str]:
    """(rows, description) of a labeled split: the embedded speaker task, or a table's labeled rows."""
    if source.strip().lower() == EMBEDDED_TEXT:
        with gzip.open(EMBEDDED_TEXT_FILE, "rb") as fh:
            text = fh.read().decode("utf-8")
        return speaker_examples(text, split), f"tiny-shakespeare speakers ({split})"
    files = split_files(source, split)
    if not files.table:
        raise DataError(f"{files.description} is plain text with no labels; kNN, linear and fine-tuning evaluation "
                        "need a labeled JSONL/TSV/CSV file (a text and a label column)")
    rows = [r for f in files.files for r in _table_part(read_table(f, data.text_column, data.label_column), files.part)]
    return rows, files.description


def text_examples(source: str, split: str, data, tokenizer) -> TextExamples:
    """A labeled split tokenized for evaluation; class names are the sorted distinct labels (numbers
    in numeric order)."""
    rows, description = labeled_rows(source, split, data)
    labeled = [r for r in rows if r.label is not None and r.label != ""]
    names = sorted({r.label for r in labeled}, key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))
    index = {n: i for i, n in enumerate(names)}
    texts = [r.text for r in rows]
    ids = tokenizer.encode_batch(texts) if texts else []
    labels = [index[r.label] if r.label in index else -1 for r in rows]
    digest = hashlib.sha256(json.dumps([texts, labels, tokenizer.fingerprint, data.seq_len]).encode()).hexdigest()[:16]
    return TextExamples(ids, labels, names, seq_len=data.seq_len, pad_id=tokenizer.pad_id, name=description,
                        fingerprint=digest, texts=texts)


def corpus_sample(files: SplitFiles, data, max_chars: int = 200 << 20) -> Iterator[str]:
    """The split's documents for training a tokenizer, up to ``max_chars`` characters (a tokenizer's
    statistics settle long before a large corpus ends)."""
    seen = 0
    for doc in documents(files, data):
        if doc:
            yield doc
            seen += len(doc)
            if seen >= max_chars:
                return
