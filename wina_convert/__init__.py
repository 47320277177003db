"""wina-convert: WINA-ready sparse checkpoints for Hugging Face causal language models.

``convert`` writes a checkpoint, ``load`` runs one sparse, ``evaluate`` measures it and ``push``
uploads it; each CLI command of ``wina`` is one of these functions.

Importing the package is light (no torch, no transformers): the four functions are attributes
resolved on first use. docs/development.md ("Layout of the package") says which module holds what.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from .errors import WinaError
from .version import __version__

__all__ = ["WinaError", "__version__", "convert", "load", "evaluate", "push"]

# public name -> (module, attribute): imported on first use
_LAZY = {
    "convert": ("wina_convert.convert", "convert"),
    "load": ("wina_convert.runtime.load", "load"),
    "evaluate": ("wina_convert.evaluate.perplexity", "evaluate"),
    "push": ("wina_convert.hub.push", "push"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'wina_convert' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(ModuleType):
    """The package module. ``wina_convert.convert`` and ``wina_convert.evaluate`` are also the names of
    a submodule and a subpackage; importing those would bind them over the functions (the import system
    sets the parent's attribute), so that binding is skipped: the modules stay in ``sys.modules``."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
