"""The ``Example:`` sections of the package's docstrings run as doctests.

Every public module of the package (no ``_private`` module, no ``__main__``) is imported and its docstrings are
collected with :mod:`doctest`; each docstring with examples is one test. A module that cannot be imported because
an optional extra is missing, or an example that imports a missing optional package, is skipped with the name of the
package, so the same test passes with or without the extras. This is ``pytest --doctest-modules`` restricted to what
can run here, without making the package's own import depend on pytest.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import io
import pkgutil

import pytest
import torch

import mixshare_layers

OPTIONAL = {
    "torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "matplotlib", "triton", "tqdm", "tensorboard",
    "lightning", "torch_uncertainty", "torchmetrics", "sklearn", "scipy",
}  # fmt: skip
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _public_modules() -> list[str]:
    names = [mixshare_layers.__name__]
    for info in pkgutil.walk_packages(mixshare_layers.__path__, prefix=mixshare_layers.__name__ + "."):
        parts = info.name.split(".")
        if any(part.startswith("_") for part in parts[1:]):
            continue
        names.append(info.name)
    return sorted(names)


def _collect() -> list[object]:
    params: list[object] = []
    finder = doctest.DocTestFinder(exclude_empty=True)
    for name in _public_modules():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in OPTIONAL:
                params.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=f"needs {exc.name}")))
                continue
            raise
        for test in finder.find(module, name):
            if test.examples and test.name.startswith(name):
                params.append(pytest.param(test, id=test.name))
    return params


_TESTS = _collect()


def _needs(test: doctest.DocTest) -> set[str]:
    roots: set[str] = set()
    for example in test.examples:
        try:
            tree = ast.parse(example.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots & OPTIONAL


def test_core_api_has_examples() -> None:
    """The central classes keep their examples (a refactor that drops one fails here)."""
    names = {p.id for p in _TESTS}  # type: ignore[attr-defined]
    for short in (
        "layers.mixer.CutMixMixer",
        "layers.unmixer.Unmixer",
        "layers.encoder.MultiEncoder",
        "layers.head.MultiHead",
        "wrapper.MIMOWrapper",
        "layers.batcher.MIMOBatcher",
        "layers.loss.MIMOLoss",
        "mix_info.MixInfo",
    ):
        assert f"mixshare_layers.{short}" in names, f"mixshare_layers.{short} lost its doctested example"


@pytest.mark.parametrize("test", _TESTS)
def test_docstring_examples(test: doctest.DocTest) -> None:
    for name in sorted(_needs(test)):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"example needs the optional package {name}")
    torch.manual_seed(0)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(test, out=out.write, clear_globs=True)
    if result.failed:
        # an example whose library code imports a missing extra lazily (e.g. matplotlib inside a plotting call):
        # the library raises an ImportError that names the package (and the extra to install)
        text = out.getvalue()
        missing = sorted(n for n in OPTIONAL if importlib.util.find_spec(n) is None)
        named = [n for n in missing if "ImportError" in text and n in text]
        if named:
            pytest.skip(f"example needs the optional package {named[0]}")
    assert result.failed == 0, out.getvalue()
