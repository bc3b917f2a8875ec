"""MIMO losses: MixMo's ratio-based weights and the summed per-subnetwork cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_floating, check_int, check_ndim, check_targets, check_tensor

__all__ = ["mimo_cross_entropy", "rebalanced_weights"]

_NO_IGNORE = torch.iinfo(torch.int64).min  # an ignore_index no label can hold


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
    ignore_index: int | None = None,
) -> Tensor:
    """``sum_k mean_b w_bk * CE(logits_bk, y_bk)``.

    Args:
        logits: ``(B, M, K)``.
        targets: class indices ``(B, M)`` in ``[0, K)`` (any integer dtype).
        weights: ``(B, M)`` per-sample, per-member weights (``None``: all ones).
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        ignore_index: a label value to skip (e.g. ``-100``, cross-entropy's usual one). Skipped entries add nothing
            and each member's mean is over its labelled samples only: ``sum_k (sum_b w_bk CE_bk) / n_k`` with
            ``n_k`` the number of labelled samples of member ``k`` (a member with none adds 0). ``None`` (default):
            every label must be a class index.

    Returns:
        A scalar: the sum over subnetworks of the batch means (0 for an empty batch).

    Raises:
        TypeError: float / bool targets, integer logits, a non-tensor.
        ValueError: shapes that do not match, targets on another device, labels outside ``[0, K)`` (checked for
            tensors in host memory; on a GPU PyTorch's device-side assert fires instead, see
            :func:`~mixshare_layers.set_value_checks`).

    Shape:
        - ``logits``: ``(B, M, K)``; ``targets`` and ``weights``: ``(B, M)``; output: ``()``.

    Example:
        >>> logits = torch.zeros(4, 2, 10)  # uniform predictions: CE = log(10) for each member
        >>> mimo_cross_entropy(logits, torch.zeros(4, 2, dtype=torch.long))
        tensor(4.6052)
        >>> targets = torch.tensor([[0, 1], [-100, 2], [3, -100], [4, 5]])  # two unlabelled entries
        >>> mimo_cross_entropy(logits, targets, ignore_index=-100)  # each member: the mean of its 3 labels
        tensor(4.6052)
    """
    check_ndim("logits", logits, 3, "(B, M, K)")
    check_floating("logits", logits)
    b, m, k = logits.shape
    if ignore_index is not None:
        ignore_index = check_int("ignore_index", ignore_index)
        if 0 <= ignore_index < k:
            raise ValueError(f"ignore_index must not be a class index in [0, {k}), but got {ignore_index}")
    targets = check_targets(
        "targets", targets, shape=(b, m), layout="(B, M)", num_classes=k, device=logits.device,
        ignore_index=ignore_index,
    )  # fmt: skip
    acc = torch.promote_types(logits.dtype, torch.float32)  # float32 at least, float64 kept
    ce = F.cross_entropy(
        logits.reshape(b * m, k).to(acc),
        targets.reshape(b * m),
        reduction="none",
        label_smoothing=label_smoothing,
        # without an ignore_index, no label value may be skipped: F.cross_entropy's default (-100) would drop such
        # labels silently, so give it one no label can hold (on a GPU a -100 then meets the kernel's range assert)
        ignore_index=_NO_IGNORE if ignore_index is None else ignore_index,
    ).view(b, m)
    if weights is not None:
        check_tensor("weights", weights, "(B, M)")
        if weights.shape != (b, m):
            raise ValueError(f"weights must have shape (B, M) = {(b, m)}, but got {tuple(weights.shape)}")
        ce = ce * weights.to(ce.dtype)
    if ignore_index is not None:
        labelled = (targets != ignore_index).sum(dim=0).clamp_min(1)  # (M,), on device: no synchronisation
        return (ce.sum(dim=0) / labelled).sum()
    return ce.mean(dim=0).sum() if b > 0 else ce.sum()
