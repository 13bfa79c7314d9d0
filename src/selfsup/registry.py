"""One registry for methods and backbones: the CLI, the configs and `selfsup methods` use it."""

from __future__ import annotations

import difflib
from typing import Callable

from selfsup.errors import ConfigError

METHODS: dict[str, type] = {}
BACKBONES: dict[str, Callable] = {}
BACKBONE_MODALITIES: dict[str, str] = {}  # backbone name -> the modality it encodes


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
    from selfsup.methods import register_all

    register_all()

    key = str(name).lower()
    if key not in METHODS:
        raise _unknown("method", str(name), list(METHODS))
    return METHODS[key]


def backbone_modality(name: str) -> str | None:
    """The modality backbone ``name`` encodes (``timm:<model>``: image); None for an unknown name,
    which ``get_backbone_builder`` reports."""
    import selfsup.backbones  # noqa: F401  (registers every backbone)

    return BACKBONE_MODALITIES.get("timm" if name.startswith("timm:") else name)


def get_backbone_builder(name: str) -> Callable:
    import selfsup.backbones  # noqa: F401  (registers every backbone)

    if name.startswith("timm:"):
        return BACKBONES["timm"]
    if name not in BACKBONES:
        raise _unknown("backbone", name, [b for b in BACKBONES if b != "timm"] + ["timm:<model>"])
    return BACKBONES[name]
