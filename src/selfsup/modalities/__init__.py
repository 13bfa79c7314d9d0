"""Modalities: what a batch holds, which data sources and encoders belong to it, how it is viewed.

A batch names its modality by its keys (``images``; later ``tokens`` + ``attention_mask``,
``series``, ``audio``, ``video``, ``text``). Each modality registers one :class:`Modality` here:
its batch keys, which data sources it reads (``claims``) and how (``open``). Encoders are
registered per modality too (``register_backbone(name, modality=...)``), and each Method declares
the modalities it accepts (``Method.modalities``), so a method given another modality's data or
encoder is refused in one line, at config load where that can be told without reading the data,
else when the data is opened, else on the first batch.

Adding a modality adds its files (its reader, views, encoders and methods) and one registration
line at the bottom of this file; no shared file changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from selfsup.errors import ConfigError


@dataclass(frozen=True)
class Modality:
    """One modality's entry in the registry.

    ``batch_keys``: the keys its batches carry (the first one names it); ``claims(source)``:
    whether a ``data.source`` (a built-in name or a path) is this modality's, cheaply (no data
    read); ``open(data_cfg, split, eval_size)``: the reader, returning an object with ``dataset``,
    ``mode`` and ``note`` (see ``selfsup.data.modes.OpenedData``)."""

    name: str
    batch_keys: tuple[str, ...]
    claims: Callable[[str], bool]
    open: Callable[..., Any]
    description: str = ""


MODALITIES: dict[str, Modality] = {}


def register_modality(modality: Modality) -> Modality:
    old = MODALITIES.get(modality.name)
    if old is not None and old.open is not modality.open and old.open.__qualname__ != modality.open.__qualname__:
        raise ValueError(f"modality {modality.name!r} is registered twice")
    MODALITIES[modality.name] = modality
    return modality


def get_modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise ConfigError(f"unknown modality {name!r}; available: {', '.join(sorted(MODALITIES))}")
    return MODALITIES[name]


def modality_of_batch(batch: Mapping[str, Any]) -> str | None:
    """The modality a batch names by its keys (the registered modality whose first key it holds)."""
    for modality in MODALITIES.values():
        if modality.batch_keys[0] in batch:
            return modality.name
    return None


def modality_of_source(source: str, prefer: tuple[str, ...] = ()) -> str | None:
    """The modality whose reader claims ``source``; among several, the first of ``prefer`` (a
    method's accepted modalities) that does, else the first registered. None when none does."""
    claimed = [m.name for m in MODALITIES.values() if m.claims(source)]
    for name in prefer:
        if name in claimed:
            return name
    return claimed[0] if claimed else None


def describe(modalities: tuple[str, ...]) -> str:
    """``image`` / ``image or text``: for messages."""
    return " or ".join(modalities)


def check_batch(method: str, accepted: tuple[str, ...], batch: Mapping[str, Any]) -> None:
    """One-line ConfigError when ``batch`` is not of a modality ``method`` accepts."""
    found = modality_of_batch(batch)
    if found in accepted:
        return
    keys = ", ".join(sorted(str(k) for k in batch))
    what = f"a {found} batch" if found else "a batch of no known modality"
    want = ", ".join(repr(get_modality(m).batch_keys[0]) for m in accepted if m in MODALITIES)
    raise ConfigError(f"{method} takes {describe(accepted)} batches (key {want}); it was given {what} (keys: {keys})")


def check_source(method: str, accepted: tuple[str, ...], source: str) -> None:
    """One-line ConfigError when ``data.source`` is claimed only by modalities ``method`` does not accept."""
    found = modality_of_source(source, accepted)
    if found is not None and found not in accepted:
        raise ConfigError(f"{method} trains on {describe(accepted)} data; data.source={source} is {found} data")


# the registration lines: one per modality
from selfsup.modalities import image  # noqa: E402,F401

__all__ = ["MODALITIES", "Modality", "check_batch", "check_source", "get_modality", "modality_of_batch",
           "modality_of_source", "register_modality"]
