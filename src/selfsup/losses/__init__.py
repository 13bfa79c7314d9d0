"""Self-supervised objectives as pure functions of tensors, one per paper, each with its formula
in the docstring. One module per family; everything is re-exported here:

    from selfsup.losses import nt_xent
"""

import importlib
import pkgutil

__all__: list[str] = []

# every public function of every submodule, so a new family file needs no edit here
for _info in pkgutil.iter_modules(__path__):
    _mod = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_mod, "__all__", []):
        globals()[_name] = getattr(_mod, _name)
        __all__.append(_name)
