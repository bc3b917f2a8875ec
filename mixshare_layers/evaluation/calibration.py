"""Calibration errors beyond the equal-width ECE of :mod:`~mixshare_layers.evaluation.metrics`: adaptive, classwise.

Both are fractions in ``[0, 1]`` computed from the ensemble's probabilities ``(B, K)``:

- **adaptive ECE** (Nixon et al., CVPR-W 2019): the top-label ECE over ``num_bins`` *equal-mass* bins of the sorted
  confidences, ``sum_b (n_b / N) |accuracy_b - confidence_b|``; the first ``N mod num_bins`` bins hold one sample
  more (``torch.tensor_split``'s sizes, torch-uncertainty's ``CalibrationError(adaptive=True)``); equal confidences
  keep their input order.
- **classwise ECE** (Kull et al., NeurIPS 2019): for every class ``k``, the ECE of ``p_k`` against the indicator
  ``y = k`` over equal-width bins, averaged over the classes; the bins are right-closed as in
  :func:`mixshare_layers.evaluation.metrics.calibration_bins` (``p`` in bin ``ceil(p * num_bins) - 1``, 0 in the first).
  :func:`classwise_calibration_bins` gives its sums, which add up over batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int, check_ndim
from ._common import accumulation_dtype, check_scores, check_targets
from .metrics import ECE_BINS

__all__ = [
    "adaptive_calibration_error",
    "adaptive_calibration_error_from_confidences",
    "classwise_calibration_bins",
    "classwise_calibration_error",
    "classwise_calibration_error_from_bins",
]


def adaptive_calibration_error_from_confidences(
    confidences: Tensor, hits: Tensor, num_bins: int = ECE_BINS
) -> Tensor:
    """Adaptive ECE from per-sample top-1 confidences and hits (1 if the top-1 class is right), a 0-dim tensor.

    Shape:
        - ``confidences``, ``hits``: ``(N,)``, ``N >= 1``.
    """
    confidences = check_scores("confidences", confidences)
    num_bins = check_int("num_bins", num_bins, minimum=1)
    n = confidences.numel()
    if n == 0:
        raise ValueError("the adaptive ECE needs at least one sample")
    if not isinstance(hits, Tensor) or hits.shape != confidences.shape:
        raise ValueError(f"hits must be a tensor of the shape of confidences {tuple(confidences.shape)}")
    device = confidences.device
    dtype = accumulation_dtype(device)
    order = torch.argsort(confidences, stable=True)
    conf = confidences[order].to(dtype)
    hit = hits.to(device=device, dtype=dtype)[order]
    # tensor_split sizes: the first n % num_bins bins get n // num_bins + 1 samples, the others n // num_bins
    q, r = divmod(n, num_bins)
    rank = torch.arange(n, device=device)
    big = r * (q + 1)
    bin_idx = torch.where(rank < big, rank // (q + 1), r + (rank - big) // max(q, 1))
    sums = torch.zeros(3, num_bins, device=device, dtype=dtype)
    sums[0].index_add_(0, bin_idx, torch.ones_like(conf))
    sums[1].index_add_(0, bin_idx, conf)
    sums[2].index_add_(0, bin_idx, hit)
    return (sums[1] - sums[2]).abs().sum() / n


def adaptive_calibration_error(probs: Tensor, targets: Tensor, num_bins: int = ECE_BINS) -> Tensor:
    """Adaptive (equal-mass) top-label ECE of probabilities ``probs`` (see the module docstring), a 0-dim tensor.

    Shape:
        - ``probs``: ``(B, K)``; ``targets``: ``(B,)``.

    Example:
        >>> p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.55, 0.45]])
        >>> round(float(adaptive_calibration_error(p, torch.tensor([0, 1, 0, 0]), num_bins=2)), 4)  # (0.15 + 0.4) / 4
        0.1375
    """
    check_ndim("probs", probs, 2, "(B, K)")
    targets = check_targets(probs, targets)
    conf, pred = probs.max(dim=1)
    return adaptive_calibration_error_from_confidences(conf, pred == targets, num_bins)


def classwise_calibration_bins(probs: Tensor, targets: Tensor, num_bins: int = ECE_BINS) -> Tensor:
    """Per class and bin: sample counts, summed ``p_k`` and summed ``1[y = k]``, a ``(3, K, num_bins)`` tensor.

    Shape:
        - ``probs``: ``(B, K)``; ``targets``: ``(B,)``.
    """
    check_ndim("probs", probs, 2, "(B, K)")
    targets = check_targets(probs, targets)
    num_bins = check_int("num_bins", num_bins, minimum=1)
    k = probs.shape[1]
    dtype = accumulation_dtype(probs.device)
    p = probs.to(dtype)
    idx = (p * num_bins).ceil().long().sub_(1).clamp_(0, num_bins - 1)
    idx += torch.arange(k, device=probs.device).view(1, k) * num_bins  # (B, K) into the flat (K * num_bins)
    onehot = torch.zeros_like(p).scatter_(1, targets.view(-1, 1), 1.0)
    out = torch.zeros(3, k * num_bins, device=probs.device, dtype=dtype)
    flat = idx.flatten()
    out[0].index_add_(0, flat, torch.ones(flat.numel(), device=probs.device, dtype=dtype))
    out[1].index_add_(0, flat, p.flatten())
    out[2].index_add_(0, flat, onehot.flatten())
    return out.view(3, k, num_bins)


def classwise_calibration_error_from_bins(bins: Tensor) -> Tensor:
    """The classwise ECE from :func:`classwise_calibration_bins` sums (possibly added over batches)."""
    check_ndim("bins", bins, 3, "(3, K, num_bins)")
    count, conf, hits = bins
    per_class = (conf - hits).abs().sum(dim=1) / count.sum(dim=1).clamp_min(1)  # (K,)
    return per_class.mean()


def classwise_calibration_error(probs: Tensor, targets: Tensor, num_bins: int = ECE_BINS) -> Tensor:
    """Classwise ECE (see the module docstring), a 0-dim tensor.

    Shape:
        - ``probs``: ``(B, K)``; ``targets``: ``(B,)``.

    Example:
        >>> p = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
        >>> round(float(classwise_calibration_error(p, torch.tensor([0, 1]))), 4)
        0.35
    """
    return classwise_calibration_error_from_bins(classwise_calibration_bins(probs, targets, num_bins))
