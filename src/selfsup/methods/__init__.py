"""The methods. Importing this package imports only the contract (``base``); ``register_all``,
which the registry calls on its first lookup, imports every module in it, each of which defines
one method and decorates its class with ``@register_method``, so adding a method needs no edit
here. (Importing them all here would make ``selfsup.modalities`` and the methods import each
other: a method subclasses its modality's base class, which subclasses ``Method``.)"""

import importlib
import pkgutil

from selfsup.methods.base import Method, MethodConfig, Progress, StepOutput


def register_all() -> None:
    """Import every method module (each registers its method); later calls cost nothing."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["Method", "MethodConfig", "Progress", "StepOutput", "register_all"]
