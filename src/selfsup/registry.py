"""One registry for methods and backbones: the CLI, the configs and `selfsup methods` use it."""

from __future__ import annotations

import difflib
from typing import Callable

from selfsup.errors import ConfigError

METHODS: dict[str, type] = {}
BACKBONES: dict[str, Callable] = {}


def register_method(cls: type) -> type:
    """Class decorator: makes a Method subclass reachable by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def register_backbone(name: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        BACKBONES[name] = fn
        return fn

    return deco


def _unknown(kind: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown {kind} {name!r}{hint}; available: {', '.join(sorted(known))}")


def get_method(name: str) -> type:
    import selfsup.methods  # noqa: F401  (registers every method)

    key = str(name).lower()
    if key not in METHODS:
        raise _unknown("method", str(name), list(METHODS))
    return METHODS[key]


def get_backbone_builder(name: str) -> Callable:
    import selfsup.backbones  # noqa: F401  (registers every backbone)

    if name.startswith("timm:"):
        return BACKBONES["timm"]
    if name not in BACKBONES:
        raise _unknown("backbone", name, [b for b in BACKBONES if b != "timm"] + ["timm:<model>"])
    return BACKBONES[name]
