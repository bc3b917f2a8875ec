"""The package's shape: no import circles, modules of a readable size, old import paths that still work (and warn)."""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
import sys
import warnings

import pytest

import mixshare_layers
from mixshare_layers import _deprecated

PACKAGE = pathlib.Path(mixshare_layers.__file__).parent
MAX_LINES = 450
REASON = "Longer than"  # a module over MAX_LINES says why in its first docstring line: "Longer than 450 lines: ..."


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = ["mixshare_layers", *f.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its body (imports inside functions count), with
    ``from package import module`` resolved to the module; package ``__init__`` files are left out (they only
    re-export)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join([*base, node.module] if node.module else base)
                else:
                    mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            edges[m] |= {n for n in names if n in mods and n != m and mods[n].name != "__init__.py"}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_the_circle_finder_sees_a_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_modules_are_page_sized_or_say_why():
    long = []
    for name, f in _modules().items():
        text = f.read_text()
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if not doc.startswith(REASON):
                long.append(f"{name}: {text.count(chr(10))} lines")
    assert long == []


@pytest.mark.parametrize("old", sorted(_deprecated.MOVED))
def test_moved_modules_still_import_with_a_warning(old):
    new = _deprecated.MOVED[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} has moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_moved_submodules_and_names_resolve_to_the_new_objects():
    sys.modules.pop("mixshare_layers.uncertainty.temperature", None)
    sys.modules.pop("mixshare_layers.uncertainty", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from mixshare_layers.uncertainty.temperature import fit_temperature
    from mixshare_layers.evaluation import fit_temperature as new

    assert fit_temperature is new


def test_unmoved_names_are_not_caught_by_the_alias_finder():
    with pytest.raises(ModuleNotFoundError, match=r"mixshare_layers\.no_such_module"):
        importlib.import_module("mixshare_layers.no_such_module")
    assert _deprecated._new_name("mixshare_layers.metricsx") is None


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def allowed_imports() -> dict[str, set[str]]:
    """The table of docs/architecture.md: folder or file -> what it may import."""
    doc = PACKAGE.parent / "docs" / "architecture.md"
    table: dict[str, set[str]] = {}
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0] != "`folder / file`":
            name = cells[0].strip("`").removesuffix("/").removesuffix(".py")
            table[name] = set(re.findall(r"`([\w]+)`", cells[2]))
    return table


def test_folders_import_only_what_the_architecture_page_allows():
    if not (PACKAGE.parent / "docs" / "architecture.md").is_file():
        pytest.skip("docs/ is not in this checkout")
    table = allowed_imports()
    units = {_unit(m) for m in _modules()} - {"<root>", "_version"}
    assert units <= set(table), f"folders missing from docs/architecture.md: {sorted(units - set(table))}"
    unexpected = []
    for a, targets in import_graph().items():
        for b in targets:
            ua, ub = _unit(a), _unit(b)
            if ua != ub and ua != "<root>" and ub not in table.get(ua, set()) | {"_version"}:
                unexpected.append(f"{a} -> {b}")
    assert unexpected == []
