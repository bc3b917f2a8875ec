"""Temperature scaling's tensor-level core: the tempered ensemble and the golden-section fit of its temperature.

The checked entry points are :func:`mixshare_layers.evaluation.fit_temperature` /
:func:`~mixshare_layers.evaluation.tempered_log_probs` (whose module docstring explains the two modes) and
``MIMOWrapper.calibrate``, which keeps the fitted temperatures in the model. What is here trusts its arguments,
except :func:`check_labels`, the label checks both entry points share.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .._checks import check_real
from .ensemble import ensemble_log_probs

__all__ = ["check_bounds", "check_labels", "search_temperature", "temper", "tempered_probs"]


def temper(logits: Tensor, rule: str, temperature: float, mode: str) -> tuple[Tensor, Tensor]:
    """``(ensemble, members)`` log-probabilities, ``(B, K)`` and ``(B, M, K)``, at temperature ``temperature``.

    ``mode="ensemble"``: ``log_softmax(log p_ens / T)``; ``"members"``: the rule applied to ``logits / T``.
    """
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if mode == "members":
        x = x / temperature
        return ensemble_log_probs(x, rule), torch.log_softmax(x, dim=-1)
    ens = ensemble_log_probs(x, rule)
    if temperature != 1.0:
        ens = torch.log_softmax(ens / temperature, dim=-1)
    return ens, torch.log_softmax(x, dim=-1)


def tempered_probs(logits: Tensor, rule: str, temperature: Tensor) -> Tensor:
    """``softmax(log p_ens / T)``, ``(B, M, K) -> (B, K)``, with ``T`` a 0-dim tensor that is never read on the host
    (so the computation traces, e.g. under ``torch.export``).

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
        >>> tempered_probs(logits, "logit", torch.tensor(2.0))  # softmax([1.5, 0] / 2)
        tensor([[0.6792, 0.3208]])
    """
    ens = ensemble_log_probs(logits, rule)
    return torch.softmax(ens / temperature.to(device=ens.device, dtype=ens.dtype), dim=-1)


def check_labels(name: str, labels: object, count: int, num_classes: int | None, against: str) -> Tensor:
    """``labels`` as class indices for ``count`` samples (``against`` names what gives the count), in
    ``[0, num_classes)`` when ``num_classes`` is known; a one-line ``TypeError`` / ``ValueError`` otherwise."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class indices, but got {type(labels).__name__}")
    if labels.shape != (count,):
        raise ValueError(f"{name} must have shape (N,) = ({count},) to match {against}, but got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, but got dtype {labels.dtype}")
    if count and num_classes is not None:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must be class indices in [0, {num_classes}), but got values from {lo} to {hi}")
    return labels


def check_bounds(bounds: object) -> tuple[float, float]:
    """The search interval ``(low, high)`` of a temperature fit, ``0 < low < high``, as floats."""
    if not (isinstance(bounds, tuple) and len(bounds) == 2):
        raise TypeError(f"bounds must be a tuple (low, high), but got {bounds!r}")
    lo = check_real("bounds[0]", bounds[0], low=0.0, low_inclusive=False)
    return lo, check_real("bounds[1]", bounds[1], low=lo, low_inclusive=False)


def _mean_nll(logits: Tensor, targets: Tensor, rule: str, temperature: float, mode: str, chunk: int) -> float:
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for lg, y in zip(logits.split(chunk), targets.split(chunk), strict=True):
        ens, _ = temper(lg.double(), rule, temperature, mode)
        total -= ens.gather(1, y.view(-1, 1)).sum()
    return float(total) / logits.shape[0]


def search_temperature(
    logits: Tensor,
    targets: Tensor,
    rule: str,
    mode: str,
    bounds: tuple[float, float],
    tol: float = 1e-4,
    chunk_size: int = 4096,
    stacklevel: int = 3,
) -> float:
    """The ``T`` in ``bounds`` minimising the mean NLL of the tempered ensemble: golden-section search on ``log T``
    to a bracket of width ``tol``, in float64, deterministic. Warns (``RuntimeWarning``, at ``stacklevel``: the
    default points past the public entry point that calls this) when it lies on an edge.

    Shape:
        - ``logits``: ``(N, M, K)`` with ``N > 0``; ``targets``: ``(N,)`` class indices on any device.
    """
    targets = targets.to(logits.device)

    def f(log_t: float) -> float:
        return _mean_nll(logits, targets, rule, math.exp(log_t), mode, chunk_size)

    # the NLL is unimodal in log T for mode="ensemble" (convex in 1 / T)
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = math.log(bounds[0]), math.log(bounds[1])
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    log_t = (a + b) / 2.0
    if log_t - math.log(bounds[0]) < 2 * tol or math.log(bounds[1]) - log_t < 2 * tol:
        warnings.warn(
            f"the fitted temperature {math.exp(log_t):.4g} lies on the edge of bounds={bounds}: widen the bounds",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return math.exp(log_t)
