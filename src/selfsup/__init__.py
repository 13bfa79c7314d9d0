"""selfsup: self-supervised pretraining, evaluation and export in one library.

``selfsup.create(name_or_recipe, backbone=..., **overrides)`` builds a method,
``selfsup.load(path)`` loads a run, checkpoint or export, and every registered method is
reachable by its class name (``selfsup.SimCLR``, ``selfsup.MAE``, ...). Attributes are imported
on first use, so ``import selfsup`` stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {
    "create": "selfsup.api", "load": "selfsup.api", "load_config": "selfsup.config", "Config": "selfsup.config",
    "Trainer": "selfsup.train.trainer", "Method": "selfsup.core.method", "StepOutput": "selfsup.core.method",
    "Progress": "selfsup.core.method",
}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if not name[:1].isupper():  # a submodule (``from selfsup import dist``) not imported yet
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'selfsup' has no attribute {name!r}") from None
    from selfsup.registry import METHODS, get_method

    get_method("simclr")  # imports selfsup.methods, which registers every method
    for cls in METHODS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'selfsup' has no attribute {name!r}")


def __dir__() -> list[str]:
    from selfsup.registry import METHODS, get_method

    get_method("simclr")
    return sorted([*globals(), *_LAZY, *(cls.__name__ for cls in METHODS.values())])
