"""Out-of-distribution detection metrics from per-sample uncertainty scores.

Convention (torch-uncertainty's): OOD samples are the *positive* class and a larger score means "more likely OOD"
(every score of :mod:`mixshare_layers.evaluation.scores` is oriented so). All three metrics are fractions in
``[0, 1]`` and handle tied scores exactly: a threshold never splits a group of equal scores.

- ``auroc``: area under the ROC curve (trapezoids between the thresholds; 0.5 = chance, 1 = perfect).
- ``aupr``: average precision with OOD as positive (AUPR-Out): ``sum_i (R_i - R_{i-1}) P_i`` over the thresholds,
  as scikit-learn's ``average_precision_score`` and torchmetrics' ``BinaryAveragePrecision``.
- ``fpr95``: the share of in-distribution samples flagged OOD at the first threshold that detects at least 95 %
  of the OOD samples (torch-uncertainty's ``FPR95``; lower is better).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_real
from ._common import accumulation_dtype, check_scores

__all__ = ["ood_detection_metrics"]


def ood_detection_metrics(id_scores: Tensor, ood_scores: Tensor, *, recall: float = 0.95) -> dict[str, Tensor]:
    """AUROC, AUPR and FPR at ``recall`` of OOD detection by thresholding a score (see the module docstring).

    Args:
        id_scores: scores of in-distribution samples (the negatives).
        ood_scores: scores of OOD samples (the positives).
        recall: the true-positive rate of ``fpr95`` (0.95).

    Returns:
        ``{"auroc", "aupr", "fpr95"}``, 0-dim float64 tensors (float32 on MPS) on the scores' device.

    Shape:
        - ``id_scores``: ``(N_id,)``; ``ood_scores``: ``(N_ood,)``; both non-empty.

    Example:
        >>> m = ood_detection_metrics(torch.tensor([0.1, 0.2, 0.6]), torch.tensor([0.5, 0.9]))
        >>> {k: round(float(v), 4) for k, v in m.items()}
        {'auroc': 0.8333, 'aupr': 0.8333, 'fpr95': 0.3333}
    """
    id_scores = check_scores("id_scores", id_scores)
    ood_scores = check_scores("ood_scores", ood_scores)
    recall = check_real("recall", recall, low=0.0, high=1.0, low_inclusive=False)
    if id_scores.numel() == 0 or ood_scores.numel() == 0:
        raise ValueError(
            f"OOD detection needs in-distribution and OOD samples, but got {id_scores.numel()} in-distribution and "
            f"{ood_scores.numel()} OOD scores"
        )
    device = id_scores.device
    dtype = accumulation_dtype(device)
    scores = torch.cat([id_scores.to(dtype), ood_scores.to(device=device, dtype=dtype)])
    if bool(torch.isnan(scores).any()):
        raise ValueError("the scores contain NaN")
    labels = torch.cat(
        [torch.zeros(id_scores.numel(), device=device), torch.ones(ood_scores.numel(), device=device)]
    ).to(dtype)
    order = torch.argsort(scores, descending=True, stable=True)
    s, lab = scores[order], labels[order]
    # one threshold after every group of equal scores
    ends = torch.cat(
        [torch.nonzero(s[1:] != s[:-1]).squeeze(1), torch.tensor([s.numel() - 1], device=device)]
    )
    tp = lab.cumsum(0)[ends]
    fp = (ends + 1).to(dtype) - tp
    tpr = tp / ood_scores.numel()
    fpr = fp / id_scores.numel()
    zero = torch.zeros(1, device=device, dtype=dtype)
    tpr0, fpr0 = torch.cat([zero, tpr]), torch.cat([zero, fpr])
    auroc = ((fpr0[1:] - fpr0[:-1]) * (tpr0[1:] + tpr0[:-1]) / 2).sum()
    aupr = ((tpr0[1:] - tpr0[:-1]) * tp / (tp + fp)).sum()
    # the first threshold reaching the recall (the last one always has recall 1); 1e-12 absorbs rounding of tp / P
    first = torch.nonzero(tpr >= recall - 1e-12)[0, 0]
    return {"auroc": auroc, "aupr": aupr, "fpr95": fpr[first]}
