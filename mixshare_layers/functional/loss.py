"""MIMO losses: MixMo's ratio-based weights and the summed per-subnetwork cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_ndim

__all__ = ["mimo_cross_entropy", "rebalanced_weights"]


def rebalanced_weights(ratios: Tensor, rebalance_root: float | None) -> Tensor:
    """MixMo's loss weights ``w_k = M λ_k^(1/r) / sum_j λ_j^(1/r)``, shape ``(B, M)``; each row sums to M.

    Args:
        ratios: the realised mixing ratios λ (``MixInfo.ratios``).
        rebalance_root: r. ``1`` keeps the mixing ratios (``M λ_k``, MixShare); larger ``r`` flattens them (MixMo
            uses 3); ``None`` gives 1 to every member.

    Shape:
        - Input: ``(B, M)``.
        - Output: ``(B, M)``.

    Example:
        >>> ratios = torch.tensor([[0.25, 0.75]])
        >>> rebalanced_weights(ratios, 1.0), rebalanced_weights(ratios, None)
        (tensor([[0.5000, 1.5000]]), tensor([[1., 1.]]))
    """
    check_ndim("ratios", ratios, 2, "(B, M)")
    if rebalance_root is None:
        return torch.ones_like(ratios)
    m = ratios.shape[1]
    powered = ratios.clamp_min(0) ** (1.0 / rebalance_root)
    total = powered.sum(dim=1, keepdim=True)
    uniform = torch.ones_like(ratios)
    return torch.where(total > 0, m * powered / torch.where(total > 0, total, 1.0), uniform)


def mimo_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``sum_k mean_b w_bk * CE(logits_bk, y_bk)``.

    Args:
        logits: ``(B, M, K)``.
        targets: class indices ``(B, M)``.
        weights: ``(B, M)`` per-sample, per-member weights (``None``: all ones).
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.

    Returns:
        A scalar: the sum over subnetworks of the batch means.

    Shape:
        - ``logits``: ``(B, M, K)``; ``targets`` and ``weights``: ``(B, M)``; output: ``()``.

    Example:
        >>> logits = torch.zeros(4, 2, 10)  # uniform predictions: CE = log(10) for each member
        >>> mimo_cross_entropy(logits, torch.zeros(4, 2, dtype=torch.long))
        tensor(4.6052)
    """
    check_ndim("logits", logits, 3, "(B, M, K)")
    if targets.shape != logits.shape[:2]:
        raise ValueError(
            f"targets must have shape (B, M) = {tuple(logits.shape[:2])} to match logits of shape "
            f"{tuple(logits.shape)}, but got {tuple(targets.shape)}"
        )
    b, m, k = logits.shape
    acc = torch.promote_types(logits.dtype, torch.float32)  # float32 at least, float64 kept
    ce = F.cross_entropy(
        logits.reshape(b * m, k).to(acc), targets.reshape(b * m), reduction="none", label_smoothing=label_smoothing
    ).view(b, m)
    if weights is not None:
        if weights.shape != (b, m):
            raise ValueError(f"weights must have shape (B, M) = {(b, m)}, but got {tuple(weights.shape)}")
        ce = ce * weights.to(ce.dtype)
    return ce.mean(dim=0).sum() if b > 0 else ce.sum()
