"""The documentation site builds in strict mode and its API reference covers every public name.

``mkdocs build --strict`` turns every warning into a failure: a broken link, a page missing from the navigation, a
cross-reference in a docstring that does not resolve, a docstring section Griffe cannot parse. The build needs the
``docs`` extra (installed by the ``dev`` extra, so CI runs it); without it the tests are skipped.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import mixshare_layers

ROOT = Path(__file__).resolve().parents[1]

for _name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
    pytest.importorskip(_name, reason="the docs extra (mkdocs-material, mkdocstrings[python]) is not installed")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # a banner of the theme about its future, not a build warning
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _inventory(site: Path) -> set[str]:
    """The object names in the site's ``objects.inv`` (Sphinx inventory v2: 4 header lines, then zlib)."""
    raw = (site / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = raw.index(b"\n", header_end) + 1
    lines = zlib.decompress(raw[header_end:]).decode("utf-8").splitlines()
    return {line.split(" ", 1)[0] for line in lines if line.strip()}


def _public_names() -> list[tuple[str, str, object]]:
    """``(module, name, object)`` for every name in the ``__all__`` of every public module of the package."""
    modules = [mixshare_layers.__name__]
    for info in pkgutil.walk_packages(mixshare_layers.__path__, prefix=mixshare_layers.__name__ + "."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            modules.append(info.name)
    found = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:  # a module behind a missing optional extra is still documented from source
            continue
        for public in getattr(module, "__all__", ()):
            if not public.startswith("__"):
                found.append((name, public, getattr(module, public)))
    return found


def test_site_has_every_page(site: Path) -> None:
    for page in (
        "index.html",
        "getting-started.html",
        "concepts/mixing.html",
        "how-to/deploy.html",
        "api/wrapper.html",
        "changelog.html",
    ):
        assert (site / page).is_file(), f"{page} missing from the built site"
    changelog = (site / "changelog.html").read_text(encoding="utf-8")
    assert mixshare_layers.__version__ in changelog, "the changelog page does not mention the current version"


def test_api_reference_covers_every_public_name(site: Path) -> None:
    inventory = _inventory(site)
    missing = []
    for module, name, obj in _public_names():
        candidates = {f"{module}.{name}"}
        if inspect.isclass(obj) or inspect.isfunction(obj):
            candidates.add(f"{obj.__module__}.{obj.__qualname__}")
        else:  # a constant: documented in the module that defines it, found by its name
            candidates |= {entry for entry in inventory if entry.rsplit(".", 1)[-1] == name}
        if not candidates & inventory:
            missing.append(f"{module}.{name}")
    assert not missing, f"public names missing from the API reference: {missing}"
