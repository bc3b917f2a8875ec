"""Griffe extension used by the documentation build (not shipped with the package).

The library's docstrings are written for two readers: ``help()`` in a terminal and this site. They use the
reStructuredText roles PyTorch users know (``:class:`~mixshare_layers.MixInfo```) and ``Example:`` headers, which
Griffe's Google parser does not understand. Before the docstrings are parsed this extension:

* turns ``Example:`` into ``Examples:`` so the doctest block renders as highlighted code;
* leaves out of the reference the instance attributes that have no docstring of their own (they repeat the
  constructor's ``Args`` or a NamedTuple's ``Attributes``);
* turns every ``:class:`` / ``:func:`` / ``:meth:`` / ``:mod:`` / ``:attr:`` / ``:data:`` / ``:exc:`` / ``:obj:``
  role that targets this package into an autorefs link (``[`MixInfo`][mixshare_layers.mix_info.MixInfo]``),
  resolving short names the way Python would from the object's own module. A link that does not resolve is left
  to autorefs, which reports it, so a wrong reference fails the strict build instead of rendering silently.
  Roles that target other libraries (``torch...``) become plain code.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import griffe

_logger = logging.getLogger("mkdocs.plugins.griffe_docstrings")

PACKAGE = "mixshare_layers"
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+?)`")
_TITLED = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^<>]+)>$")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


def _lookup(scope: griffe.Object | griffe.Alias, parts: list[str]) -> griffe.Object | griffe.Alias | None:
    """Follow ``parts`` through the members of ``scope`` (aliases followed to their targets)."""
    current: Any = scope
    for part in parts:
        members = current.members
        if part not in members:
            return None
        current = members[part]
        if current.is_alias:
            try:
                current = current.final_target
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
    return current


def _hidden(member: Any) -> bool:
    """An instance attribute without a docstring of its own: left out of the reference (see the module docstring)."""
    return (
        not member.is_alias
        and member.is_attribute
        and "instance-attribute" in member.labels
        and member.docstring is None
    )


def _resolve(obj: griffe.Object, target: str) -> griffe.Object | griffe.Alias | None:
    """The object ``target`` names, seen from ``obj``, or ``None`` when it is not an object of the package."""
    parts = target.split(".")
    root = obj.module
    while root.parent is not None:
        root = root.parent
    if parts[0] == PACKAGE:
        return _lookup(root, parts[1:])
    scope: griffe.Object | None = obj
    while scope is not None:
        found = _lookup(scope, parts)
        if found is not None:
            return found
        scope = scope.parent
    return _lookup(root, parts)


class SphinxRolesToAutorefs(griffe.Extension):
    """Rewrite the docstrings of the package before Griffe parses them (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        classes: list[griffe.Object] = []
        self._walk(pkg, set(), classes)
        # only once every docstring is rewritten (references to these attributes resolve first)
        for cls in classes:
            for name in [n for n, m in cls.members.items() if _hidden(m)]:
                del cls.members[name]

    def _walk(self, obj: griffe.Object, seen: set[str], classes: list[griffe.Object]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj, obj.docstring.value)
        if obj.is_class:
            classes.append(obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen, classes)  # type: ignore[arg-type]

    def _rewrite(self, obj: griffe.Object, text: str) -> str:
        text = _EXAMPLE.sub(r"\1Examples:", text)

        def replace(match: re.Match[str]) -> str:
            short, target = match.group(1) == "~", match.group(2).strip()
            shown = target.rsplit(".", 1)[-1] if short else target
            titled = _TITLED.match(target)
            if titled:  # :meth:`title <target>`
                shown, target = titled.group("title"), titled.group("target").strip()
            if target.split(".")[0] in {"torch", "einops", "torchvision", "timm", "numpy", "onnx", "triton"}:
                return f"`{shown}`"
            found = _resolve(obj, target)
            if found is None:
                _logger.warning("%s: cross-reference %r does not resolve to an object of %s", obj.path, target, PACKAGE)
                return f"`{shown}`"
            if _hidden(found):  # exists, but has no entry of its own to link to
                return f"`{shown}`"
            return f"[`{shown}`][{found.path}]"

        return _ROLE.sub(replace, text)
