"""Splits and labels of a set of files (audio recordings, videos) from a manifest or from folders: the rules the
file-based readers share (``selfsup.data.audio``, ``selfsup.data.video``), the first that applies:

1. a manifest (``labels.csv`` and the like) beside the files: a file column, a label column (``data.label_column``,
   else ``label`` / ``class`` / ``category`` / ``target``) and an optional ``split`` column (``train`` / ``val`` /
   ``test``); files it does not list are left out (split "");
2. folders: ``train/``, ``val/``, ``test/`` at the top give the split, and the folder under them (or the top folder
   when there are no split folders) the class;
3. otherwise a fixed fifth of the files (by a hash of their name) is the test split, and the description says so.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from selfsup.errors import ConfigError, DataError

SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
LABEL_COLUMNS = ("label", "class", "category", "target")


@dataclass
class Layout:
    """Which split and label each file has (label names, or None where unlabeled)."""

    split: list[str]  # train | val | test | "" (left out)
    labels: list[str] | None
    how: str  # one line for the data's description
    label_kinds: tuple[str, ...] = ()


def hashed_split(names: Sequence[str], split: Sequence[str] | None = None) -> list[str]:
    """A fixed fifth of ``names``, by a hash of each name, as the test split, the rest train (names whose
    ``split`` entry is "" stay left out)."""
    return ["" if split is not None and not split[i] else
            "test" if int(hashlib.sha1(n.encode()).hexdigest(), 16) % 5 == 0 else "train"
            for i, n in enumerate(names)]


def file_column(columns: Sequence[str], names: Sequence[str]) -> str | None:
    """The manifest column naming the files: the first of ``names`` present (any case), else the first column."""
    lower = {c.lower().strip(): c for c in columns if c}
    return next((lower[c] for c in names if c in lower), columns[0] if columns else None)


def manifest_layout(names: Sequence[str], manifests: dict[str, str], label_column: str | None, *,
                    file_columns: Sequence[str], items: str, by_basename: bool = False) -> Layout | None:
    """The layout the shallowest manifest gives (None without one). Its file entries are relative to its folder;
    with ``by_basename`` an entry may also name a file by its path below the manifest or its bare name (audio
    manifests list bare names); ``items`` names the files in messages (``files``, ``videos``)."""
    if not manifests:
        return None
    where, text = min(manifests.items(), key=lambda kv: (kv[0].count("/"), kv[0]))
    base = where.rsplit("/", 1)[0] + "/" if "/" in where else ""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise DataError(f"{where}: the manifest has no rows")
    columns = list(rows[0].keys())
    lower = {c.lower().strip(): c for c in columns if c}
    file_col = file_column(columns, file_columns)
    if label_column is not None:
        if label_column not in columns:
            raise ConfigError(f"data.label_column={label_column!r} is not a column of {where} ({', '.join(columns)})")
        label_col: str | None = label_column
    else:
        label_col = next((lower[c] for c in LABEL_COLUMNS if c in lower), None)
    split_col = lower.get("split")
    entry: dict[str, dict[str, str]] = {}
    for row in rows:
        key = (row.get(file_col) or "").strip().strip("/")
        if key:
            entry.setdefault(base + key, row)
            if by_basename:
                entry.setdefault(key, row)
    split: list[str] = []
    labels: list[str] = []
    for n in names:
        row = entry.get(n)
        if row is None and by_basename:
            row = entry.get(n[len(base):]) or entry.get(Path(n).name)
        if row is None:
            split.append("")
            labels.append("")
            continue
        s = (row.get(split_col) or "train").strip().lower() if split_col else "train"
        if s not in SPLIT_DIRS:
            raise DataError(f"{where}: split {s!r} of {n} is not train, val or test")
        split.append(SPLIT_DIRS[s])
        labels.append((row.get(label_col) or "").strip() if label_col else "")
    how = f"manifest {where}" + (f", labels from its {label_col!r} column" if label_col else ", no label column")
    if not split_col:
        split = hashed_split(names, split)
        how += f"; no split column, so a fixed fifth of the {items} (by name hash) is the test split"
    return Layout(split, labels if label_col else None, how)


def folder_layout(names: Sequence[str], label_column: str | None, *, items: str, manifest: str) -> Layout:
    """The layout the folders give (``manifest`` names the manifest files in the message refusing a label column)."""
    if label_column is not None:
        raise ConfigError(f"data.label_column={label_column!r}: this source has no manifest ({manifest}) with columns; "
                          "its labels come from its folders")
    dirs = [n.split("/")[:-1] for n in names]
    if any(d and d[0].lower() in SPLIT_DIRS for d in dirs):
        split = [SPLIT_DIRS.get(d[0].lower(), "") if d else "" for d in dirs]
        classes = [d[1] if len(d) > 1 else "" for d in dirs]
        labeled = all(c for c, s in zip(classes, split) if s)
        how = "train/val/test folders" + (", a class folder in each" if labeled else ", no class folders")
        return Layout(split, classes if labeled else None, how)
    classes = [d[0] if d else "" for d in dirs]
    labeled = all(classes)
    how = (("class folders" if labeled else "no labels")
           + f"; no split folders, so a fixed fifth of the {items} (by name hash) is the test split")
    return Layout(hashed_split(names), classes if labeled else None, how)


__all__ = ["LABEL_COLUMNS", "SPLIT_DIRS", "Layout", "file_column", "folder_layout", "hashed_split", "manifest_layout"]
