"""The package ships ``py.typed``, so its annotations are a promise: mypy must be clean on it.

Runs ``mypy`` with the configuration of pyproject.toml (``[tool.mypy]``: the package, Python 3.10 semantics,
unused ``type: ignore`` comments reported). Skipped where mypy is not installed (the ``dev`` extra brings it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mypy", reason="mypy is not installed (dev extra)")


def test_mypy_is_clean_on_the_package() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mypy found problems:\n{proc.stdout}\n{proc.stderr}"
