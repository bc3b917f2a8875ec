"""Atomic file writes for the analysis outputs (see :mod:`mixshare_layers.checkpoint.files`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint.files import atomic_write

__all__ = ["atomic_write", "write_json"]


def write_json(path: str | os.PathLike[str], obj: object) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
