"""Importing this package registers every method: each module in it defines one method and
decorates its class with ``@register_method``, so adding a method needs no edit here."""

import importlib
import pkgutil

from selfsup.methods.base import Method, MethodConfig, Progress, StepOutput

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "MethodConfig", "Progress", "StepOutput"]
