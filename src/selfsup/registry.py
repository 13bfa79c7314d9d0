"""One registry for methods, backbones and modalities: the CLI, the configs and `selfsup methods` use it.

It sits at the bottom of the layers (it imports nothing of selfsup but its errors): the packages
that define methods, backbones and modalities register into it when they are imported, and the
lookups import those packages by name the first time they are needed (``PROVIDERS``), as a
plugin system would, so no module has to import them all up front.

A modality (see ``selfsup.modalities``) is one :class:`Modality` entry: the keys its batches carry,
which data sources it claims and its reader. A batch names its modality by its keys, each method
declares the modalities it accepts and each backbone the one it encodes, and ``check_batch`` /
``check_source`` turn a mismatch into one line.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from selfsup.errors import ConfigError

METHODS: dict[str, type] = {}
BACKBONES: dict[str, Callable] = {}
BACKBONE_MODALITIES: dict[str, str] = {}  # backbone name -> the modality it encodes
MODALITIES: dict[str, Modality] = {}

PROVIDERS = {"method": "selfsup.methods", "backbone": "selfsup.backbones", "modality": "selfsup.modalities"}
"""The package whose import registers every entry of a kind (``load_all``)."""


def load_all(kind: str) -> None:
    """Import the package that registers every ``kind`` (method, backbone, modality); cheap once done."""
    module = importlib.import_module(PROVIDERS[kind])
    register_all = getattr(module, "register_all", None)
    if register_all is not None:
        register_all()


def _origin(obj: Callable) -> str:
    """Where ``obj`` is defined: module, qualified name and, for functions (lambdas share a name), line."""
    code = getattr(obj, "__code__", None)
    line = f" (line {code.co_firstlineno})" if code is not None else ""
    return f"{obj.__module__}.{obj.__qualname__}{line}"


def _add(table: dict, kind: str, name: str, obj: Callable) -> None:
    """``table[name] = obj``, refusing a second, different object under a name already taken (it
    would silently replace the first). The same definition registered again (its module
    re-imported, e.g. by ``importlib.reload``) replaces the old one, as re-running a module should."""
    old = table.get(name)
    if old is not None and old is not obj and _origin(old) != _origin(obj):
        raise ValueError(f"{kind} {name!r} is registered twice: by {_origin(old)} and by {_origin(obj)}; "
                         "give one of them another name")
    table[name] = obj


def register_method(cls: type) -> type:
    """Class decorator: makes a Method subclass reachable by its ``name`` (unique)."""
    _add(METHODS, "method", cls.name, cls)
    return cls


def register_backbone(name: str, *, modality: str) -> Callable[[Callable], Callable]:
    """Decorator: makes a backbone builder ``fn(BackboneConfig) -> nn.Module`` reachable by ``name``
    (unique), as an encoder of ``modality``."""

    def deco(fn: Callable) -> Callable:
        _add(BACKBONES, "backbone", name, fn)
        BACKBONE_MODALITIES[name] = modality
        return fn

    return deco


def _unknown(kind: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown {kind} {name!r}{hint}; available: {', '.join(sorted(known))}")


def get_method(name: str) -> type:
    load_all("method")

    key = str(name).lower()
    if key not in METHODS:
        raise _unknown("method", str(name), list(METHODS))
    return METHODS[key]


def backbone_modality(name: str) -> str | None:
    """The modality backbone ``name`` encodes (``timm:<model>``: image); None for an unknown name,
    which ``get_backbone_builder`` reports."""
    load_all("backbone")
    return BACKBONE_MODALITIES.get("timm" if name.startswith("timm:") else name)


def get_backbone_builder(name: str) -> Callable:
    load_all("backbone")

    if name.startswith("timm:"):
        return BACKBONES["timm"]
    if name not in BACKBONES:
        raise _unknown("backbone", name, [b for b in BACKBONES if b != "timm"] + ["timm:<model>"])
    return BACKBONES[name]


# --------------------------------------------------------------------------------------
# modalities


@dataclass(frozen=True)
class Modality:
    """One modality's entry in the registry.

    ``batch_keys``: the keys its batches carry (the first one names it); ``claims(source)``:
    whether a ``data.source`` (a built-in name or a path) is this modality's, cheaply (no data
    read); ``open(cfg, split, evaluation=False)``: the reader of a run's data (its ``data``
    section), returning an object with ``dataset``, ``mode`` and ``note`` (see
    ``selfsup.data.modes.OpenedData``), prepared for training or, with ``evaluation``, as labeled
    samples for the probes; ``configure(cfg) -> cfg``: settings that depend on the data and must be
    fixed before the encoder is built (text: the tokenizer and so the vocabulary size), or None."""

    name: str
    batch_keys: tuple[str, ...]
    claims: Callable[[str], bool]
    open: Callable[..., Any]
    description: str = ""
    configure: Callable[[Any], Any] | None = None


def register_modality(modality: Modality) -> Modality:
    old = MODALITIES.get(modality.name)
    if old is not None and old.open is not modality.open and _origin(old.open) != _origin(modality.open):
        raise ValueError(f"modality {modality.name!r} is registered twice: by {_origin(old.open)} and by "
                         f"{_origin(modality.open)}")
    MODALITIES[modality.name] = modality
    return modality


def get_modality(name: str) -> Modality:
    load_all("modality")
    if name not in MODALITIES:
        raise _unknown("modality", name, list(MODALITIES))
    return MODALITIES[name]


def modality_of_batch(batch: Mapping[str, Any]) -> str | None:
    """The modality a batch names by its keys (the registered modality whose first key it holds)."""
    load_all("modality")
    for modality in MODALITIES.values():
        if modality.batch_keys[0] in batch:
            return modality.name
    return None


def modality_of_source(source: str, prefer: tuple[str, ...] = ()) -> str | None:
    """The modality whose reader claims ``source``; among several, the first of ``prefer`` (a
    method's accepted modalities) that does, else the first registered. None when none does."""
    load_all("modality")
    claimed = [m.name for m in MODALITIES.values() if m.claims(source)]
    for name in prefer:
        if name in claimed:
            return name
    return claimed[0] if claimed else None


def run_modality(method: str, backbone: str, source: str) -> str:
    """The modality a run trains on: the method's only one; for a method of several (the two-view
    methods take images or series), its encoder's, else its data's, else its first."""
    accepted = get_method(method).modalities
    if len(accepted) == 1:
        return accepted[0]
    encoder = backbone_modality(backbone)
    if encoder in accepted:
        return encoder
    found = modality_of_source(source, accepted)
    return found if found in accepted else accepted[0]


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
    want = ", ".join(repr(MODALITIES[m].batch_keys[0]) for m in accepted if m in MODALITIES)
    raise ConfigError(f"{method} takes {describe(accepted)} batches (key {want}); it was given {what} (keys: {keys})")


def float_batch(method: str, accepted: tuple[str, ...], key: str, batch: Any, dims: tuple[int, ...], what: str) -> Any:
    """The float tensor ``batch[key]`` (a bare tensor is taken as it), after one-line ConfigErrors for a
    batch of another modality (``check_batch``) or a tensor that is not float with one of ``dims``
    dimensions (``what`` names the layout: "series batches are float (B, C, T)")."""
    if not hasattr(batch, "dim"):
        if key not in batch:
            check_batch(method, accepted, batch)
        batch = batch[key]
    if batch.dim() not in dims or not batch.is_floating_point():
        raise ConfigError(f"{method}: {what}, got {tuple(batch.shape)} {batch.dtype}")
    return batch


def check_source(method: str, accepted: tuple[str, ...], source: str) -> None:
    """One-line ConfigError when ``data.source`` is claimed only by modalities ``method`` does not accept."""
    found = modality_of_source(source, accepted)
    if found is not None and found not in accepted:
        raise ConfigError(f"{method} trains on {describe(accepted)} data; data.source={source} is {found} data")
