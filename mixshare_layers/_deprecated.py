"""Old import paths of modules that moved, kept working for one release with a ``DeprecationWarning``.

``import mixshare_layers.uncertainty`` (or any module below it) gives the module at its new place and warns once
per name. The table :data:`MOVED` is the whole list; remove an entry one release after it was added.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

__all__ = ["MOVED", "install"]

#: old module name -> new module name (the version that moved it, in CHANGELOG.md)
MOVED = {
    "mixshare_layers.multi_encoder": "mixshare_layers.layers.encoder",
    "mixshare_layers.mixer": "mixshare_layers.layers.mixer",
    "mixshare_layers.unmixer": "mixshare_layers.layers.unmixer",
    "mixshare_layers.multi_head": "mixshare_layers.layers.head",
    "mixshare_layers.loss": "mixshare_layers.layers.loss",
    "mixshare_layers.batcher": "mixshare_layers.layers.batcher",
    "mixshare_layers.metrics": "mixshare_layers.evaluation.metrics",
    "mixshare_layers.shift": "mixshare_layers.evaluation.shift",
    "mixshare_layers.uncertainty": "mixshare_layers.evaluation",
}


def _new_name(name: str) -> str | None:
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        warnings.warn(
            f"{spec.name} has moved to {self.new}; the old path works until the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.new)

    def exec_module(self, module: types.ModuleType) -> None:
        """The module is already executed at its new place."""


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = _new_name(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
