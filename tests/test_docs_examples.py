"""The code on the documentation pages runs, so the pages cannot drift from the library.

Every fenced block opened with exactly ```` ```python ```` in a page of docs/ is executed, the blocks of one page in
order in one namespace (a page reads as one script). Blocks meant to be read only (a download, a GPU, a long run)
are fenced with ```` ```py ```` instead (see docs/README.md). A page whose code imports an optional package that is
not installed is skipped.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# pages written by other parts of the project, with commands rather than library code
NOT_EXECUTED = {"README.md", "benchmarks.md", "reproducing.md"}
OPTIONAL = {
    "torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "matplotlib", "triton", "tqdm", "tensorboard",
    "lightning", "torch_uncertainty", "torchmetrics", "sklearn", "scipy",
}  # fmt: skip
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL
)


def _pages() -> list[Path]:
    pages = sorted(p for p in DOCS.rglob("*.md") if p.name not in NOT_EXECUTED and "_ext" not in p.parts)
    return [p for p in pages if _FENCE.search(p.read_text(encoding="utf-8"))]


def _code(page: Path) -> str:
    blocks = [textwrap.dedent(m.group("body")) for m in _FENCE.finditer(page.read_text(encoding="utf-8"))]
    return "\n".join(blocks)


def _imported_roots(code: str) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_docs_have_executable_pages() -> None:
    names = {p.relative_to(DOCS).as_posix() for p in _pages()}
    # the pages that promise runnable code must keep having some
    assert {
        "getting-started.md", "concepts/mixing.md", "how-to/custom-backbone.md", "how-to/schedules.md",
        "how-to/calibration.md",
    } <= names  # fmt: skip


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _code(page)
    for name in sorted(_imported_roots(code) & OPTIONAL):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{page.name} needs the optional package {name}")
    monkeypatch.chdir(tmp_path)  # anything a page writes lands in a temporary folder
    torch.manual_seed(0)
    exec(compile(code, str(page), "exec"), {"__name__": f"docs_page_{page.stem}"})


def test_readme_usage_runs_and_prints_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's usage block runs, and its last line prints what the comment beside it says."""
    pytest.importorskip("torchvision")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = textwrap.dedent(_FENCE.search(text).group("body"))
    promised = code.rstrip().splitlines()[-1].split("#", 1)[1].strip()
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_usage"})
    assert capsys.readouterr().out.strip() == promised


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text.split("<!-- test-command -->", 1)[1]
    match = re.search(r"```bash\n(.*?)```", after, re.DOTALL)
    assert match is not None, "README.md has no ```bash block after the test-command marker"
    return match.group(1).strip()


def test_getting_started_shows_the_ci_test_command() -> None:
    command = _readme_test_command()
    assert command in (DOCS / "getting-started.md").read_text(encoding="utf-8")
