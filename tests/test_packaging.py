"""Distribution: one version, a changelog entry for it, and a wheel that holds the whole package and nothing else.

The full proof that the wheel works on its own (a fresh virtual environment, the wheel and its declared
dependencies only, a smoke test run outside the source tree) is a stage of ``.ci/run`` (``.ci/wheel_smoke.py``):
it installs torch into a second environment, too slow for the test suite.
"""

from __future__ import annotations

import configparser
import email.parser
import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mixshare_layers

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mixshare_layers"


def test_version_is_defined_once() -> None:
    from mixshare_layers import _version

    assert mixshare_layers.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", _version.__version__)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    assert cfg["metadata"]["version"].strip() == "attr: mixshare_layers._version.__version__"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if "[project]" in pyproject:  # metadata moved to pyproject.toml: the version must still come from _version.py
        assert re.search(r"^dynamic\s*=.*\"version\"", pyproject, re.MULTILINE), "pyproject.toml sets a static version"
    others = [
        p.relative_to(ROOT).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name != "_version.py" and re.search(r"^__version__\s*=", p.read_text(encoding="utf-8"), re.MULTILINE)
    ]
    assert not others, f"__version__ assigned outside mixshare_layers/_version.py: {others}"


def test_changelog_has_the_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[([^\]]+)\]", text, re.MULTILINE)
    assert headings, "CHANGELOG.md has no '## [version]' section"
    assert headings[0] == mixshare_layers.__version__, (
        f"the newest CHANGELOG.md section is {headings[0]!r}, but the package is {mixshare_layers.__version__}"
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(-1, "--no-build-isolation")  # build with this environment's setuptools: no download
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"building the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("mixshare_layers-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_the_whole_package_only(wheel: Path) -> None:
    assert wheel.name.startswith(f"mixshare_layers-{mixshare_layers.__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert sources <= names, f"modules missing from the wheel: {sorted(sources - names)}"
    assert "mixshare_layers/py.typed" in names
    outside = sorted(n for n in names if not n.startswith(("mixshare_layers/", "mixshare_layers-")))
    assert not outside, f"files outside the package in the wheel: {outside}"


def test_wheel_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    assert meta["Name"] == "mixshare-layers"
    assert meta["Version"] == mixshare_layers.__version__
    requires = meta.get_all("Requires-Dist") or []
    hard = sorted(re.split(r"[<>=!~; \[]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r)
    assert hard == ["einops", "torch"], f"hard dependencies must be torch and einops only, got {hard}"
    extras = set(meta.get_all("Provides-Extra") or [])
    expected = {"examples", "timm", "triton", "analysis", "export", "docs", "dev", "lightning", "torch-uncertainty"}
    assert expected <= extras


def test_ruff_is_clean():
    """The repository's ruff configuration (pyproject.toml) reports nothing (ruff comes with the ``dev`` extra)."""
    import shutil

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([ruff, "check", "--no-cache", str(root)], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
