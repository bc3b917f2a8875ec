"""Import an optional framework, or fail with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ``ImportError`` saying ``pip install "mixshare-layers[extra]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the optional package {module.split('.')[0]!r} ({exc}): "
            f'pip install "mixshare-layers[{extra}]"'
        ) from exc
