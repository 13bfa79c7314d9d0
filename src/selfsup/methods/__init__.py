"""The methods, one module each. Importing this package imports none of them: ``register_all``,
which the registry calls on its first lookup, imports every module in it, each of which defines
one method and decorates its class with ``@register_method``, so adding a method needs no edit
here. The contract they implement is ``selfsup.core.method``; each subclasses its modality's
base class (``selfsup.modalities.image.ImageMethod``)."""

import importlib
import pkgutil

from selfsup.core.method import (  # the contract, for convenience
    Method,
    MethodConfig,
    Progress,
    StepOutput,
)


def register_all() -> None:
    """Import every method module (each registers its method); later calls cost nothing."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["Method", "MethodConfig", "Progress", "StepOutput", "register_all"]
