"""Temperature scaling of an M-member ensemble (Guo et al., ICML 2017), fitted on a validation split.

Two places a single temperature ``T > 0`` can act (``mode``):

- ``"ensemble"`` (default): on the *ensemble's* log-probabilities, after the ensemble rule:
  ``p_T = softmax(log p_ens / T)``. With ``rule="logit"`` this is classic temperature scaling of the averaged
  logits, ``softmax(mean_m z_m / T)``; with ``rule="prob"`` it rescales the log of the mixture
  ``mean_m softmax(z_m)`` (the "post-ensemble" temperature). The members are untouched: their accuracies, the
  disagreement and the mutual information do not change. The NLL is convex in ``1 / T``, so the fit finds the
  global minimum.
- ``"members"``: on every member's logits before the rule, ``z_m / T`` (one temperature shared by the members,
  "pooled" temperature scaling); the mutual information changes with ``T``. With ``rule="logit"`` both modes are
  the same function.

The fit minimises the mean NLL (nats) of the tempered ensemble on the given logits by golden-section search over
``log T`` in ``bounds``, in float64, deterministic. The accuracy does not change in mode ``"ensemble"`` or with
``rule="logit"`` (a temperature keeps the arg-max); in mode ``"members"`` with ``rule="prob"`` it reweighs the
members inside the mixture, so the arg-max of a few samples can move.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .._checks import check_choice, check_ndim, check_real
from ..functional.ensemble import ensemble_log_probs
from ..vocabulary import ENSEMBLE_RULES, TEMPERATURE_MODES

__all__ = ["TEMPERATURE_MODES", "fit_temperature", "tempered_log_probs"]


def tempered_log_probs(
    logits: Tensor, rule: str = "prob", temperature: float = 1.0, mode: str = "ensemble"
) -> tuple[Tensor, Tensor]:
    """The ensemble's and the members' log-probabilities at temperature ``temperature``.

    Args:
        logits: the members' logits.
        rule: ``"prob"`` (mean of member probabilities) or ``"logit"`` (mean of logits), see
            :func:`mixshare_layers.functional.ensemble_log_probs`.
        temperature: ``T > 0``; 1 leaves everything as it is.
        mode: ``"ensemble"`` (``T`` divides the ensemble's log-probabilities) or ``"members"`` (``T`` divides every
            member's logits), see the module docstring.

    Returns:
        ``(ensemble, members)``: ``(B, K)`` and ``(B, M, K)`` log-probabilities, float32 at least.

    Shape:
        - ``logits``: ``(B, M, K)``.

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
        >>> ens, members = tempered_log_probs(logits, "logit", temperature=2.0)
        >>> ens.exp()  # softmax([1.5, 0] / 2)
        tensor([[0.6792, 0.3208]])
    """
    check_ndim("logits", logits, 3, "(B, M, K)")
    check_choice("rule", rule, ENSEMBLE_RULES)
    check_choice("mode", mode, TEMPERATURE_MODES)
    t = check_real("temperature", temperature, low=0.0, low_inclusive=False)
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if mode == "members":
        x = x / t
        return ensemble_log_probs(x, rule), torch.log_softmax(x, dim=-1)
    ens = ensemble_log_probs(x, rule)
    if t != 1.0:
        ens = torch.log_softmax(ens / t, dim=-1)
    return ens, torch.log_softmax(x, dim=-1)


def _mean_nll(logits: Tensor, targets: Tensor, rule: str, temperature: float, mode: str, chunk: int) -> float:
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for lg, y in zip(logits.split(chunk), targets.split(chunk), strict=True):
        ens, _ = tempered_log_probs(lg.double(), rule, temperature, mode)
        total -= ens.gather(1, y.view(-1, 1)).sum()
    return float(total) / logits.shape[0]


def fit_temperature(
    logits: Tensor,
    targets: Tensor,
    rule: str = "prob",
    *,
    mode: str = "ensemble",
    bounds: tuple[float, float] = (0.05, 20.0),
    tol: float = 1e-4,
    chunk_size: int = 4096,
) -> float:
    """The temperature minimising the validation NLL of the tempered ensemble (see the module docstring).

    Args:
        logits: validation logits of the M members (never the test set's).
        targets: validation labels.
        rule: the ensemble rule the temperature is fitted for (``"prob"`` or ``"logit"``).
        mode: ``"ensemble"`` or ``"members"``.
        bounds: the search interval for ``T``; a warning says when the optimum lies on its edge.
        tol: width of the final bracket in ``log T`` (1e-4: the temperature to 0.01 %).
        chunk_size: samples per float64 evaluation (bounds the memory).

    Returns:
        ``T`` as a Python float.

    Shape:
        - ``logits``: ``(N, M, K)``; ``targets``: ``(N,)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = 2.0 * torch.randn(4000, 5, generator=g)  # calibrated logits: the labels are drawn from softmax(z)
        >>> y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
        >>> logits = (3.0 * z).unsqueeze(1).expand(-1, 2, -1)  # two members, both 3x over-confident
        >>> round(fit_temperature(logits, y), 1)
        3.0
    """
    check_ndim("logits", logits, 3, "(N, M, K)")
    if targets.shape != (logits.shape[0],):
        raise ValueError(
            f"targets must have shape (N,) = ({logits.shape[0]},) to match logits of shape {tuple(logits.shape)}, "
            f"but got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class indices, but got dtype {targets.dtype}")
    if logits.shape[0] == 0:
        raise ValueError("cannot fit a temperature on an empty validation set (logits has 0 rows)")
    check_choice("rule", rule, ENSEMBLE_RULES)
    check_choice("mode", mode, TEMPERATURE_MODES)
    if not (isinstance(bounds, tuple) and len(bounds) == 2):
        raise TypeError(f"bounds must be a tuple (low, high), but got {bounds!r}")
    lo = check_real("bounds[0]", bounds[0], low=0.0, low_inclusive=False)
    hi = check_real("bounds[1]", bounds[1], low=lo, low_inclusive=False)
    tol = check_real("tol", tol, low=0.0, low_inclusive=False)
    targets = targets.to(logits.device)

    def f(log_t: float) -> float:
        return _mean_nll(logits, targets, rule, math.exp(log_t), mode, chunk_size)

    # golden-section search on log T (the NLL is unimodal in log T for mode="ensemble": convex in 1 / T)
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = math.log(lo), math.log(hi)
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
    if log_t - math.log(lo) < 2 * tol or math.log(hi) - log_t < 2 * tol:
        warnings.warn(
            f"the fitted temperature {math.exp(log_t):.4g} lies on the edge of bounds={bounds}: widen the bounds",
            RuntimeWarning,
            stacklevel=2,
        )
    return math.exp(log_t)
