"""Selective prediction: the risk-coverage curve and its area (AURC, Geifman & El-Yaniv, NeurIPS 2017).

The model keeps the ``k`` samples it is most certain about (lowest uncertainty score) and abstains on the rest; the
*risk* at coverage ``k / N`` is the error rate on the kept samples. Tied scores are handled exactly: when a group of
equal scores straddles ``k``, the kept part of the group counts its *expected* errors (the group's error rate times
the number kept), the mean over every order of the group, so the curve does not depend on how a sort breaks ties.

``aurc`` is torch-uncertainty's normalisation of the area: trapezoids of the risk over the coverages
``1 / N, 2 / N, ..., 1``, divided by the width ``1 - 1 / N`` of that support; on untied scores it equals
torch-uncertainty's ``AURC`` exactly. A fraction in ``[0, 1]``, lower is better; the error rate is its value for
an uninformative score and ``~ e + (1 - e) log(1 - e)`` (``e`` the error rate) the value of a perfect ranking.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import accumulation_dtype, check_scores

__all__ = ["aurc", "risk_coverage_curve"]


def risk_coverage_curve(uncertainty: Tensor, errors: Tensor) -> tuple[Tensor, Tensor]:
    """The risk at every coverage ``k / N``, ``k = 1 .. N``, keeping the least uncertain samples first.

    Args:
        uncertainty: per-sample uncertainty score (e.g. ``1 - max probability``; larger = abstain first).
        errors: per-sample error indicator (bool, or 0 / 1), e.g. ``prediction != label``.

    Returns:
        ``(coverage, risk)``, both ``(N,)`` float64 (float32 on MPS) fractions.

    Shape:
        - ``uncertainty``, ``errors``: ``(N,)``.

    Example:
        >>> cov, risk = risk_coverage_curve(torch.tensor([0.1, 0.3, 0.3, 0.9]), torch.tensor([0, 1, 0, 1]))
        >>> risk.tolist()  # the tie at 0.3 counts half an error at k = 2
        [0.0, 0.25, 0.3333333333333333, 0.5]
    """
    uncertainty = check_scores("uncertainty", uncertainty)
    if not isinstance(errors, Tensor) or errors.shape != uncertainty.shape:
        shape = tuple(errors.shape) if isinstance(errors, Tensor) else type(errors).__name__
        raise ValueError(f"errors must be a tensor of the shape of uncertainty {tuple(uncertainty.shape)}, got {shape}")
    n = uncertainty.numel()
    device = uncertainty.device
    dtype = accumulation_dtype(device)
    order = torch.argsort(uncertainty, stable=True)
    u = uncertainty[order]
    e = errors.to(device=device, dtype=dtype)[order]
    _, group, counts = torch.unique_consecutive(u, return_inverse=True, return_counts=True)
    group_errors = torch.zeros(counts.numel(), device=device, dtype=dtype).index_add_(0, group, e)
    before = group_errors.cumsum(0) - group_errors  # errors in the groups before
    start = counts.cumsum(0) - counts  # samples before each group
    k = torch.arange(1, n + 1, device=device, dtype=dtype)
    kept_in_group = k - start[group].to(dtype)
    cumulative = before[group] + kept_in_group * group_errors[group] / counts[group].to(dtype)
    return k / n, cumulative / k


def aurc(uncertainty: Tensor, errors: Tensor) -> Tensor:
    """Area under the risk-coverage curve (see the module docstring), a 0-dim tensor.

    Args:
        uncertainty: per-sample uncertainty score (larger = abstain first).
        errors: per-sample error indicator.

    Shape:
        - ``uncertainty``, ``errors``: ``(N,)`` with ``N >= 2``.

    Example:
        >>> # a perfect ranking of 2 errors in 4: risks 0, 0, 1/3, 1/2 at coverages 1/4 .. 1
        >>> round(float(aurc(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, 0, 1, 1]))), 4)
        0.1944
    """
    uncertainty = check_scores("uncertainty", uncertainty)
    if uncertainty.numel() < 2:
        raise ValueError(f"AURC needs at least 2 samples, but got {uncertainty.numel()}")
    coverage, risk = risk_coverage_curve(uncertainty, errors)
    area = ((coverage[1:] - coverage[:-1]) * (risk[1:] + risk[:-1]) / 2).sum()
    return area / (1.0 - 1.0 / uncertainty.numel())
