"""Folding M generic heads reading one shared pooled vector into one stacked module (``deploy.fold_heads``).

A head folds when, in eval mode, it computes ``Linear(norm(x))`` on a pooled vector ``x`` of size D, with ``norm`` one
of: nothing, an affine LayerNorm over D (``nn.LayerNorm`` or a subclass: timm's ``LayerNorm`` / ``LayerNorm2d``,
torchvision's ``LayerNorm2d``), an ``nn.RMSNorm`` over D, or an ``nn.BatchNorm1d`` with running statistics; and
anything else in the head only reshapes (a view to ``(B, D, 1, 1)`` and a flatten back, the pooling of a one-cell
map) or is the identity in eval mode (dropout, ``nn.Identity``). Then, for member ``i`` with ``Linear(W_i, b_i)``:

* LayerNorm / RMSNorm with affine ``gamma_i, beta_i`` (the same ``eps`` in every member): the normalisation of the
  shared vector is the same for every member, so the M heads are one norm without affine followed by one
  ``nn.Linear(D, M * K)`` with rows ``W_i diag(gamma_i)`` and bias ``W_i beta_i + b_i``;
* BatchNorm1d in eval (``x * s_i + t_i`` per feature): one ``nn.Linear(D, M * K)`` with ``W_i diag(s_i)``,
  ``W_i t_i + b_i``;
* no norm: the members' linear layers stacked.

Rows are member-major (row ``i * K + k``), like :meth:`MultiHead.as_linear <mixshare_layers.MultiHead.as_linear>`.

How a head is recognised: ``torch.fx`` traces it in eval mode, with norms, linear layers and dropouts as leaves
(timm's head methods, torchvision's ``Sequential`` and wrappers are traced through); the graph may hold one linear
layer, at most one norm before it on every path from the input, and otherwise only modules and functions that move
or select values (reshapes, slices, concatenations of zeros, means and maxima: a pooling of one cell), no arithmetic
and no other parameter. The folded module is then built in float64 and compared with the M heads in float64 on random
vectors (batches of 1 and 8, small, unit and large scales); anything short of agreement to ``1e-10`` relative keeps
the heads as they are. A head that cannot be traced (data-dependent control flow), an MLP, an activation between the
norm and the linear layer, members with different ``eps`` or architectures: all stay generic.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Pattern", "agrees", "match", "stacked", "tensors"]

_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d)
# modules that, in eval mode, only move values (or are the identity)
_PASSING = (
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.Flatten,
    nn.Unflatten,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_PASSING_FUNCTIONS = {
    operator.getitem,
    torch.cat,
    torch.concat,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.squeeze,
    torch.unsqueeze,
    torch.transpose,
    torch.mean,
    torch.amax,
    torch.zeros,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_PASSING_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "mean",
    "amax",
    "new_zeros",
}
# reads of metadata only: no value flows through them
_METADATA_METHODS = {"size", "dim"}
_METADATA_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
_RELATIVE_TOLERANCE = 1e-10


class Pattern(NamedTuple):
    norm: nn.Module | None
    linear: nn.Linear


class _Tracer(torch.fx.Tracer):
    """Norms, linear layers and dropouts stay leaves, whatever their class (timm's subclasses included)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (*_NORMS, nn.Linear, *_PASSING)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _is_metadata(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return (
        node.op == "call_function"
        and node.target is builtins.getattr
        and len(node.args) == 2
        and node.args[1] in _METADATA_ATTRIBUTES
    )


def _passes(node: torch.fx.Node) -> bool:
    """Whether a function / method node only moves values (or reads metadata)."""
    if _is_metadata(node):
        return True
    if node.op == "call_method":
        return node.target in _PASSING_METHODS
    if node.target in _DROPOUT_FUNCTIONS:  # the identity when not training
        return node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True) is False
    return node.target in _PASSING_FUNCTIONS


def _reaches(start: torch.fx.Node, target: torch.fx.Node, avoid: torch.fx.Node | None) -> bool:
    """Whether a value flows from ``start`` to ``target`` on a path that does not go through ``avoid``."""
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        if node is target:
            return True
        for user in node.users:
            if user is not avoid and user not in seen and not _is_metadata(user):
                seen.add(user)
                stack.append(user)
    return False


def match(head: nn.Module) -> Pattern | None:
    """``head``'s norm and linear layer if it is ``[norm ->] Linear`` up to value moves (see the module docstring)."""
    try:
        graph = _Tracer().trace(head)
    except Exception:  # data-dependent control flow, an untraceable call: the head is not recognised
        return None
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    output = next(node for node in graph.nodes if node.op == "output")
    norm_node = linear_node = None
    norm: nn.Module | None = None
    linear: nn.Linear | None = None
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module":
            module = head.get_submodule(str(node.target))
            if isinstance(module, nn.Linear):
                if linear_node is not None:
                    return None
                linear_node, linear = node, module
            elif isinstance(module, _NORMS):
                if norm_node is not None or linear_node is not None:
                    return None
                norm_node, norm = node, module
            elif not isinstance(module, _PASSING) or any(True for _ in module.parameters()):
                return None
        elif node.op in ("call_function", "call_method"):
            if not _passes(node):
                return None
        else:  # get_attr: a parameter or buffer read by the head's own code
            return None
    if len(inputs) != 1 or linear_node is None or linear is None:
        return None
    (x,) = inputs
    # every path from the input to the linear layer goes through the norm, and every path to the output through the
    # linear layer (no bypass)
    if norm_node is not None and (not _reaches(x, norm_node, None) or _reaches(x, linear_node, norm_node)):
        return None
    if not _reaches(x, linear_node, None) or _reaches(x, output, linear_node):
        return None
    return Pattern(norm, linear)


def _norm_kind(norm: nn.Module | None) -> str:
    if norm is None:
        return "none"
    if isinstance(norm, nn.BatchNorm1d):
        return "batch"
    return "rms" if isinstance(norm, nn.RMSNorm) else "layer"


def tensors(modules: Iterable[nn.Module]) -> list[Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]


def stacked(patterns: list[Pattern]) -> nn.Module | None:
    """The stacked module of matched float64 heads, or ``None`` if the members do not share one normalisation."""
    kinds = {_norm_kind(p.norm) for p in patterns}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    d, k = patterns[0].linear.in_features, patterns[0].linear.out_features
    if any(p.linear.in_features != d or p.linear.out_features != k for p in patterns):
        return None
    weight = torch.stack([p.linear.weight for p in patterns])  # (M, K, D)
    zeros_k, ones_d, zeros_d = (torch.zeros(k, dtype=torch.float64), torch.ones(d, dtype=torch.float64),
                                torch.zeros(d, dtype=torch.float64))  # fmt: skip
    bias = torch.stack([zeros_k if p.linear.bias is None else p.linear.bias for p in patterns])  # (M, K)
    has_bias = any(p.linear.bias is not None for p in patterns)
    norm: nn.Module | None = None
    if kind in ("layer", "rms"):
        norms = [p.norm for p in patterns if isinstance(p.norm, (nn.LayerNorm, nn.RMSNorm))]
        eps = norms[0].eps
        if len(norms) != len(patterns) or any(tuple(n.normalized_shape) != (d,) or n.eps != eps for n in norms):
            return None
        gamma = torch.stack([ones_d if n.weight is None else n.weight for n in norms])  # (M, D)
        betas = [n.bias if isinstance(n, nn.LayerNorm) else None for n in norms]  # nn.RMSNorm has no shift
        beta = torch.stack([zeros_d if b is None else b for b in betas])  # (M, D)
        has_bias = has_bias or any(b is not None for b in betas)
        if isinstance(norms[0], nn.LayerNorm):
            norm = nn.LayerNorm(d, eps=norms[0].eps, elementwise_affine=False, dtype=torch.float64)
        else:
            norm = nn.RMSNorm(d, eps=norms[0].eps, elementwise_affine=False, dtype=torch.float64)
    elif kind == "batch":
        bns = [p.norm for p in patterns]
        if any(
            not isinstance(n, nn.BatchNorm1d) or n.num_features != d or n.running_mean is None or n.running_var is None
            for n in bns
        ):
            return None  # no running statistics: eval mode normalises with the batch's own
        scales, shifts = [], []
        for n in bns:
            assert isinstance(n, nn.BatchNorm1d) and n.running_mean is not None and n.running_var is not None
            scale = (n.running_var + n.eps).rsqrt()
            shift = -n.running_mean * scale
            if n.weight is not None:
                scale, shift = scale * n.weight, shift * n.weight
            if n.bias is not None:
                shift = shift + n.bias
            scales.append(scale)
            shifts.append(shift)
        gamma, beta = torch.stack(scales), torch.stack(shifts)
        has_bias = True
    else:
        gamma, beta = ones_d.expand(len(patterns), d), zeros_d.expand(len(patterns), d)
    linear = nn.Linear(d, len(patterns) * k, bias=has_bias, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_((weight * gamma[:, None, :]).reshape(-1, d))
        if linear.bias is not None:
            linear.bias.copy_((bias + torch.einsum("mkd,md->mk", weight, beta)).reshape(-1))
    return linear if norm is None else nn.Sequential(norm, linear)


def agrees(folded: nn.Module, heads: nn.Module, d: int, k: int, m: int) -> bool:
    """Whether the folded module (float64) computes the heads (float64, eval) on random pooled vectors."""
    gen = torch.Generator().manual_seed(0)
    for rows, scale, offset in ((8, 1.0, 0.0), (1, 1.0, 0.5), (8, 1e-3, 0.0), (8, 50.0, 3.0)):
        x = torch.randn(rows, d, generator=gen, dtype=torch.float64) * scale + offset
        try:
            expected, got = heads(x), folded(x)
        except Exception:  # the heads do not run on pooled vectors of this size
            return False
        if not isinstance(expected, Tensor) or expected.shape != (rows, m, k) or got.shape != (rows, m * k):
            return False
        got = got.view(rows, m, k)
        if not (torch.isfinite(expected).all() and torch.isfinite(got).all()):
            return False
        if float((got - expected).abs().max()) > _RELATIVE_TOLERANCE * max(float(expected.abs().max()), 1e-300):
            return False
    return True
