"""Evaluation metrics of an M-subnetwork ensemble, accumulated on the device and read once per evaluation.

Conventions (the same in every function and in :class:`EnsembleMetrics`):

- Inputs are the logits of the M subnetworks, ``(B, M, K)`` (M axis on dim 1, as everywhere in the library), and
  the labels ``(B,)``. The ensemble prediction is :func:`mixshare_layers.functional.ensemble_log_probs` with
  ``rule="prob"`` (mean of the member probabilities, the NLL of the mixture) or ``rule="logit"`` (mean of the
  logits, then softmax, as in MixMo's code): say which one with the numbers.
- Accuracies and the disagreement are fractions in [0, 1]; NLL in nats per sample; ECE in [0, 1] with 15
  equal-width confidence bins ``(0, 1/15], (1/15, 2/15], ...``; Brier score = the *sum over classes* of the
  squared error per sample (in [0, 2]; not divided by K, the mistake noted in REFERENCE.md section 6).
- Disagreement = the mean over pairs ``i < j`` of subnetworks of the share of samples where their top-1 classes
  differ (0 for M = 1).

Member health: :func:`collapsed_members` names the subnetworks whose accuracy stayed near chance while another one
learned (a failure of MIMO training that the ensemble accuracy hides: the ensemble is carried by the others).

Sharing rates (paper Sec. 2) are properties of the weights, not of the data: see
:func:`mixshare_layers.analysis.sharing_rates`. Uncertainty metrics that need every sample (OOD detection, AURC,
adaptive and classwise ECE), temperature scaling and evaluation under corruptions are in
:mod:`mixshare_layers.evaluation` (:class:`~mixshare_layers.evaluation.UncertaintyMetrics` extends
:class:`EnsembleMetrics` with them, in the same units).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_ndim, check_real
from ..functional.ensemble import ensemble_log_probs
from ..vocabulary import ENSEMBLE_RULES

__all__ = [
    "ECE_BINS",
    "EnsembleMetrics",
    "brier_score",
    "calibration_bins",
    "collapsed_members",
    "disagreement",
    "expected_calibration_error",
]

ECE_BINS = 15


def _check_logits_targets(logits: Tensor, targets: Tensor) -> None:
    check_ndim("logits", logits, 3, "(B, M, K)")
    if targets.shape != (logits.shape[0],):
        raise ValueError(
            f"targets must have shape (B,) = ({logits.shape[0]},) to match logits of shape {tuple(logits.shape)}, "
            f"but got {tuple(targets.shape)}"
        )
    if targets.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"targets must hold integer class indices, but got dtype {targets.dtype}")


def calibration_bins(probs: Tensor, targets: Tensor, num_bins: int = ECE_BINS) -> Tensor:
    """Per-bin sums for the calibration error, ``(3, num_bins)``: sample counts, summed confidences, hits.

    A sample whose top-1 probability is ``c`` falls in bin ``ceil(c * num_bins) - 1`` (right-closed bins; a
    confidence of exactly 0 goes to the first bin).

    Shape:
        - ``probs``: ``(B, K)``; ``targets``: ``(B,)``.
    """
    check_ndim("probs", probs, 2, "(B, K)")
    num_bins = check_int("num_bins", num_bins, minimum=1)
    conf, pred = probs.max(dim=1)
    idx = (conf * num_bins).ceil().long().sub_(1).clamp_(0, num_bins - 1)
    hits = (pred == targets).to(conf.dtype)
    out = torch.zeros(3, num_bins, dtype=conf.dtype, device=probs.device)
    out[0].index_add_(0, idx, torch.ones_like(conf))
    out[1].index_add_(0, idx, conf)
    out[2].index_add_(0, idx, hits)
    return out


def _ece_from_bins(bins: Tensor) -> Tensor:
    count, conf, hits = bins
    return (conf - hits).abs().sum() / count.sum().clamp_min(1)


def expected_calibration_error(probs: Tensor, targets: Tensor, num_bins: int = ECE_BINS) -> Tensor:
    """ECE: ``sum_b (n_b / N) |accuracy_b - confidence_b|`` over equal-width confidence bins (0-dim tensor).

    Example:
        >>> p = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
        >>> round(float(expected_calibration_error(p, torch.tensor([0, 1]))), 4)
        0.35
    """
    return _ece_from_bins(calibration_bins(probs, targets, num_bins))


def brier_score(probs: Tensor, targets: Tensor) -> Tensor:
    """Mean over samples of ``sum_k (p_k - 1[k = y])^2`` (sum over classes, not divided by K; 0-dim tensor)."""
    check_ndim("probs", probs, 2, "(B, K)")
    return _brier_sum(probs, targets) / max(probs.shape[0], 1)


def _brier_sum(probs: Tensor, targets: Tensor) -> Tensor:
    # sum_k (p_k - y_k)^2 = sum_k p_k^2 - 2 p_y + 1, without materialising a one-hot matrix
    p_true = probs.gather(1, targets.view(-1, 1)).squeeze(1)
    return (probs.square().sum(dim=1) - 2 * p_true + 1).sum()


def _disagreement_sum(preds: Tensor) -> Tensor:
    """Sum over samples of the mean over pairs of members of ``1[pred_i != pred_j]``; ``preds`` is ``(B, M)``."""
    m = preds.shape[1]
    if m < 2:
        return preds.new_zeros((), dtype=torch.float32)
    differ = (preds.unsqueeze(2) != preds.unsqueeze(1)).float()  # (B, M, M)
    pairs = m * (m - 1)  # ordered pairs: the off-diagonal entries, each unordered pair counted twice
    return differ.sum() / pairs


def disagreement(logits: Tensor) -> Tensor:
    """Mean pairwise top-1 disagreement between the M subnetworks of ``logits`` ``(B, M, K)`` (0-dim tensor)."""
    check_ndim("logits", logits, 3, "(B, M, K)")
    return _disagreement_sum(logits.argmax(dim=2)) / max(logits.shape[0], 1)


def collapsed_members(
    member_acc: Sequence[float] | Tensor,
    num_classes: int,
    *,
    tolerance: float = 0.1,
    min_gain: float = 0.1,
) -> list[int]:
    """The subnetworks that collapsed: accuracy near chance while another subnetwork learned.

    Each member's *gain* over chance is ``g_i = (a_i - 1/K) / (1 - 1/K)`` (0 at chance, 1 when perfect, negative
    below chance). Member ``i`` has collapsed when the best member learned (``max_j g_j >= min_gain``) and member
    ``i`` kept at most a ``tolerance`` share of that gain (``g_i <= tolerance * max_j g_j``). A network where every
    member is near chance has not learned yet: nothing is flagged.

    Args:
        member_acc: the M members' top-1 accuracies as fractions in [0, 1] (``EnsembleMetrics.compute()``'s
            ``individual_acc``; divide percentages by 100).
        num_classes: K, for the chance level ``1 / K``.
        tolerance: the largest share of the best member's gain that still counts as collapsed, in [0, 1).
        min_gain: the gain the best member must reach for the others to be judged, in (0, 1].

    Returns:
        The indices of the collapsed members, in increasing order (empty when all are healthy).

    Example:
        >>> collapsed_members([0.988, 0.004], num_classes=20)  # a member below the 5 % of chance
        [1]
        >>> collapsed_members([0.80, 0.71], num_classes=20), collapsed_members([0.06, 0.05], num_classes=20)
        ([], [])
    """
    k = check_int("num_classes", num_classes, minimum=2)
    tolerance = check_real("tolerance", tolerance, low=0.0, high=1.0, high_inclusive=False)
    min_gain = check_real("min_gain", min_gain, low=0.0, high=1.0, low_inclusive=False)
    accs = member_acc.tolist() if isinstance(member_acc, Tensor) else list(member_acc)
    if len(accs) == 0 or any(isinstance(a, (list, tuple)) for a in accs):
        raise ValueError(f"member_acc must be a flat sequence of M >= 1 accuracies, but got {member_acc!r}")
    for a in accs:
        check_real("member_acc", a, low=0.0, high=1.0)
    chance = 1.0 / k
    gains = [(float(a) - chance) / (1.0 - chance) for a in accs]
    best = max(gains)
    if best < min_gain:
        return []
    return [i for i, g in enumerate(gains) if g <= tolerance * best]


class EnsembleMetrics:
    """Streaming metrics of an M-subnetwork ensemble, kept as on-device sums (no host sync in :meth:`update`).

    Call :meth:`update` for every batch, then :meth:`compute` once (one device-to-host copy); in a distributed
    run, :meth:`all_reduce` first sums the states of every process in one collective.

    Args:
        num_subnetworks: M.
        rule: ensemble rule, ``"prob"`` (average probabilities) or ``"logit"`` (average logits).
        num_bins: confidence bins of the ECE (15).
        device: where the sums live (the logits' device).

    Example:
        >>> acc = EnsembleMetrics(2)
        >>> acc.update(torch.randn(8, 2, 10), torch.randint(10, (8,)))
        >>> sorted(acc.compute())
        ['brier', 'count', 'disagreement', 'ece', 'ensemble_acc', 'individual_acc', 'mean_individual_acc', 'nll']
    """

    def __init__(
        self,
        num_subnetworks: int,
        rule: str = "prob",
        *,
        num_bins: int = ECE_BINS,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_subnetworks = check_int("num_subnetworks", num_subnetworks, minimum=1)
        self.rule = check_choice("rule", rule, ENSEMBLE_RULES)
        self.num_bins = check_int("num_bins", num_bins, minimum=1)
        device = torch.device("cpu" if device is None else device)
        # float64 keeps counts exact far beyond CIFAR sizes; MPS has no float64
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        # layout of the flat state: count, ensemble hits, nll, brier, disagreement, member hits (M), bins (3 x nb)
        self._size = 5 + self.num_subnetworks + 3 * self.num_bins
        self.state = torch.zeros(self._size, dtype=self.dtype, device=device)

    def __repr__(self) -> str:
        return f"EnsembleMetrics(num_subnetworks={self.num_subnetworks}, rule={self.rule!r}, num_bins={self.num_bins})"

    def reset(self) -> None:
        """Zero every sum."""
        self.state.zero_()

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor, *, log_probs: Tensor | None = None) -> None:
        """Add a batch: ``logits`` ``(B, M, K)`` of the M subnetworks and ``targets`` ``(B,)``.

        ``log_probs``: the ensemble's log-probabilities ``(B, K)``, when they are not the ones ``rule`` makes from
        ``logits`` (e.g. after temperature scaling); the member accuracies and the disagreement still come from
        ``logits``.
        """
        _check_logits_targets(logits, targets)
        if logits.shape[1] != self.num_subnetworks:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} have {logits.shape[1]} subnetworks on dim 1, but the "
                f"accumulator was built for num_subnetworks={self.num_subnetworks}"
            )
        targets = targets.to(logits.device)
        if log_probs is None:
            log_p = ensemble_log_probs(logits, self.rule)  # (B, K), float32 at least
        else:
            if log_probs.shape != (logits.shape[0], logits.shape[2]):
                raise ValueError(
                    f"log_probs must have shape (B, K) = ({logits.shape[0]}, {logits.shape[2]}) to match logits of "
                    f"shape {tuple(logits.shape)}, but got {tuple(log_probs.shape)}"
                )
            log_p = log_probs.float() if log_probs.dtype in (torch.float16, torch.bfloat16) else log_probs
        probs = log_p.exp()
        member_pred = logits.argmax(dim=2)  # (B, M)
        parts = [
            torch.tensor([float(logits.shape[0])], dtype=self.dtype, device=logits.device),
            (probs.argmax(dim=1) == targets).sum().view(1),
            -log_p.gather(1, targets.view(-1, 1)).sum().view(1),
            _brier_sum(probs, targets).view(1),
            _disagreement_sum(member_pred).view(1),
            (member_pred == targets.view(-1, 1)).sum(dim=0),
            calibration_bins(probs, targets, self.num_bins).flatten(),
        ]
        self.state += torch.cat([p.to(self.dtype) for p in parts]).to(self.state.device)

    def all_reduce(self, group: Any = None) -> None:
        """Sum the state over every process of ``group`` (a ``torch.distributed`` process group; ``None``: the
        default one), in one collective. A no-op when no process group is initialised."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.state, group=group)

    def compute(self) -> dict[str, float | list[float]]:
        """The metrics as Python numbers (one host sync). Keys: ``count``, ``ensemble_acc``, ``individual_acc``
        (list of M), ``mean_individual_acc``, ``nll``, ``ece``, ``brier``, ``disagreement`` (see module docstring).
        """
        values = self.state.tolist()
        n = values[0]
        denom = max(n, 1.0)
        m = self.num_subnetworks
        members = [v / denom for v in values[5 : 5 + m]]
        bins = values[5 + m :]
        nb = self.num_bins
        gap = sum(abs(conf - hit) for conf, hit in zip(bins[nb : 2 * nb], bins[2 * nb :], strict=True))
        return {
            "count": int(n),
            "ensemble_acc": values[1] / denom,
            "individual_acc": members,
            "mean_individual_acc": sum(members) / m,
            "nll": values[2] / denom,
            "ece": gap / denom,
            "brier": values[3] / denom,
            "disagreement": values[4] / denom,
        }
