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

from torch import Tensor

from .._checks import check_choice, check_ndim, check_real
from ..functional.temperature import check_bounds, check_labels, search_temperature, temper
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
        >>> import torch
        >>> logits = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
        >>> ens, members = tempered_log_probs(logits, "logit", temperature=2.0)
        >>> ens.exp()  # softmax([1.5, 0] / 2)
        tensor([[0.6792, 0.3208]])
    """
    check_ndim("logits", logits, 3, "(B, M, K)")
    check_choice("rule", rule, ENSEMBLE_RULES)
    check_choice("mode", mode, TEMPERATURE_MODES)
    return temper(logits, rule, check_real("temperature", temperature, low=0.0, low_inclusive=False), mode)


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
        targets: validation labels, class indices in ``[0, K)``.
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
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> z = 2.0 * torch.randn(4000, 5, generator=g)  # calibrated logits: the labels are drawn from softmax(z)
        >>> y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
        >>> logits = (3.0 * z).unsqueeze(1).expand(-1, 2, -1)  # two members, both 3x over-confident
        >>> round(fit_temperature(logits, y), 1)
        3.0
    """
    check_ndim("logits", logits, 3, "(N, M, K)")
    check_labels("targets", targets, logits.shape[0], logits.shape[2], f"logits of shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("cannot fit a temperature on an empty validation set (logits has 0 rows)")
    check_choice("rule", rule, ENSEMBLE_RULES)
    check_choice("mode", mode, TEMPERATURE_MODES)
    tol = check_real("tol", tol, low=0.0, low_inclusive=False)
    return search_temperature(logits, targets, rule, mode, check_bounds(bounds), tol, chunk_size)
