"""Turning the M subnetworks' logits into an ensemble prediction, and layout adapters."""

from __future__ import annotations

import einops
import torch
from torch import Tensor

from .._checks import check_choice, check_ndim
from ..vocabulary import ENSEMBLE_RULES

__all__ = ["ENSEMBLE_RULES", "ensemble_log_probs", "ensemble_probs", "from_estimator_major", "to_estimator_major"]


def ensemble_log_probs(logits: Tensor, rule: str = "prob") -> Tensor:
    """Log-probabilities of the ensemble, ``(B, M, K) -> (B, K)``.

    Args:
        logits: the members' logits.
        rule: ``"prob"`` averages the members' probabilities (MIMO, torch-uncertainty; the NLL is the mixture's);
            ``"logit"`` averages logits, then applies softmax (MixMo's code).

    Shape:
        - Input: ``(B, M, K)``.
        - Output: ``(B, K)``, computed in float32 at least.

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])  # two members that disagree
        >>> ensemble_log_probs(logits, "prob").exp()
        tensor([[0.5000, 0.5000]])
    """
    check_ndim("logits", logits, 3, "(B, M, K)")
    check_choice("rule", rule, ENSEMBLE_RULES)
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if rule == "logit":
        return torch.log_softmax(x.mean(dim=1), dim=-1)
    m = x.shape[1]
    return torch.logsumexp(torch.log_softmax(x, dim=-1), dim=1) - torch.log(torch.tensor(float(m), dtype=x.dtype))


def ensemble_probs(logits: Tensor, rule: str = "prob") -> Tensor:
    """Probabilities of the ensemble, ``(B, M, K) -> (B, K)`` (see :func:`ensemble_log_probs`).

    Args:
        logits: the members' logits ``(B, M, K)``.
        rule: ``"prob"`` (mean of the member probabilities) or ``"logit"`` (softmax of the mean logits).

    Shape:
        - Input: ``(B, M, K)``.
        - Output: ``(B, K)``; every row sums to 1.

    Example:
        >>> logits = torch.tensor([[[4.0, 0.0], [0.0, 1.0]]])
        >>> ensemble_probs(logits, "prob"), ensemble_probs(logits, "logit")
        (tensor([[0.6255, 0.3745]]), tensor([[0.8176, 0.1824]]))
    """
    return ensemble_log_probs(logits, rule).exp()


def to_estimator_major(logits: Tensor) -> Tensor:
    """``(B, M, K) -> (M * B, K)`` with the members in contiguous blocks (torch-uncertainty's layout).

    Args:
        logits: the members' logits.

    Shape:
        - Input: ``(B, M, K)``.
        - Output: ``(M * B, K)``: rows ``i * B`` to ``(i + 1) * B - 1`` are member ``i``.

    Example:
        >>> logits = torch.arange(12.0).view(2, 3, 2)  # B=2, M=3, K=2
        >>> to_estimator_major(logits)[:, 0]  # member 0's two samples first
        tensor([ 0.,  6.,  2.,  8.,  4., 10.])
    """
    check_ndim("logits", logits, 3, "(B, M, K)")
    return einops.rearrange(logits, "b m k -> (m b) k")


def from_estimator_major(logits: Tensor, num_subnetworks: int) -> Tensor:
    """Inverse of :func:`to_estimator_major`: ``(M * B, K) -> (B, M, K)``.

    Args:
        logits: estimator-major logits.
        num_subnetworks: M; the number of rows must be a multiple of it.

    Shape:
        - Input: ``(M * B, K)``.
        - Output: ``(B, M, K)``.

    Example:
        >>> logits = torch.randn(2, 3, 5)
        >>> torch.equal(from_estimator_major(to_estimator_major(logits), 3), logits)
        True
    """
    check_ndim("logits", logits, 2, "(M * B, K)")
    if logits.shape[0] % num_subnetworks:
        raise ValueError(
            f"logits has {logits.shape[0]} rows, which is not a multiple of num_subnetworks={num_subnetworks}"
        )
    return einops.rearrange(logits, "(m b) k -> b m k", m=num_subnetworks)
