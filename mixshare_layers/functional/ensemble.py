"""Turning the M subnetworks' logits into an ensemble prediction, and layout adapters."""

from __future__ import annotations

import einops
import torch
from torch import Tensor

from .._checks import check_choice, check_ndim

__all__ = ["ENSEMBLE_RULES", "ensemble_log_probs", "ensemble_probs", "from_estimator_major", "to_estimator_major"]

ENSEMBLE_RULES = ("prob", "logit")


def ensemble_log_probs(logits: Tensor, rule: str = "prob") -> Tensor:
    """Log-probabilities of the ensemble, ``(B, M, K) -> (B, K)``.

    ``rule="prob"`` averages the members' probabilities (MIMO, torch-uncertainty; the NLL is the mixture's);
    ``rule="logit"`` averages logits, then applies softmax (MixMo's code). Computed in float32 at least.
    """
    check_ndim("logits", logits, 3, "(B, M, K)")
    check_choice("rule", rule, ENSEMBLE_RULES)
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if rule == "logit":
        return torch.log_softmax(x.mean(dim=1), dim=-1)
    m = x.shape[1]
    return torch.logsumexp(torch.log_softmax(x, dim=-1), dim=1) - torch.log(torch.tensor(float(m), dtype=x.dtype))


def ensemble_probs(logits: Tensor, rule: str = "prob") -> Tensor:
    """Probabilities of the ensemble, ``(B, M, K) -> (B, K)`` (see :func:`ensemble_log_probs`)."""
    return ensemble_log_probs(logits, rule).exp()


def to_estimator_major(logits: Tensor) -> Tensor:
    """``(B, M, K) -> (M * B, K)`` with the members in contiguous blocks (torch-uncertainty's layout)."""
    check_ndim("logits", logits, 3, "(B, M, K)")
    return einops.rearrange(logits, "b m k -> (m b) k")


def from_estimator_major(logits: Tensor, num_subnetworks: int) -> Tensor:
    """Inverse of :func:`to_estimator_major`: ``(M * B, K) -> (B, M, K)``."""
    check_ndim("logits", logits, 2, "(M * B, K)")
    if logits.shape[0] % num_subnetworks:
        raise ValueError(
            f"logits has {logits.shape[0]} rows, which is not a multiple of num_subnetworks={num_subnetworks}"
        )
    return einops.rearrange(logits, "(m b) k -> b m k", m=num_subnetworks)
