"""Import an optional framework, or fail with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def missing(module: str, extra: str, purpose: str, exc: ImportError) -> ModuleNotFoundError:
    """The error for a missing optional package: a ``ModuleNotFoundError`` (an ``ImportError``) whose ``name`` is the
    module that failed and whose message says ``pip install "mixshare-layers[extra]"``."""
    return ModuleNotFoundError(
        f"{purpose} needs the optional package {module.split('.')[0]!r} ({exc}): "
        f'pip install "mixshare-layers[{extra}]"',
        name=exc.name or module,
    )


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or the error of :func:`missing`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing(module, extra, purpose, exc) from exc
