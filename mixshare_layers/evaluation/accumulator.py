"""``UncertaintyMetrics``: :class:`~mixshare_layers.evaluation.EnsembleMetrics` plus the per-sample metrics."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_real
from ..vocabulary import ENSEMBLE_RULES, TEMPERATURE_MODES
from ._common import accumulation_dtype, all_gather_cat, distributed_world
from .calibration import (
    adaptive_calibration_error_from_confidences,
    classwise_calibration_bins,
    classwise_calibration_error_from_bins,
)
from .metrics import ECE_BINS, EnsembleMetrics, _check_logits_targets
from .scores import UNCERTAINTY_SCORES, uncertainty_scores
from .selective import aurc
from .temperature import tempered_log_probs

__all__ = ["UncertaintyMetrics"]


class UncertaintyMetrics:
    """Streaming uncertainty metrics of an M-member ensemble on labelled data (clean or shifted).

    Keeps :class:`~mixshare_layers.evaluation.EnsembleMetrics`' on-device sums and, per sample, the ensemble's top-1
    confidence, whether it is wrong and the scores of :func:`~mixshare_layers.evaluation.uncertainty_scores` (six
    numbers per sample), for the rank-based metrics. :meth:`update` never synchronises with the host.

    Args:
        num_subnetworks: M.
        num_classes: K.
        rule: ensemble rule, ``"prob"`` (mean of member probabilities, MIMO / torch-uncertainty) or ``"logit"``
            (mean of logits, MixMo's code).
        temperature: temperature of the ensemble (1: none), see :mod:`mixshare_layers.evaluation.temperature`.
        temperature_mode: ``"ensemble"`` (``T`` divides the ensemble's log-probabilities) or ``"members"``.
        num_bins: bins of the ECE, adaptive ECE, classwise ECE and reliability diagram (15).
        device: where the state lives (the logits' device).

    :meth:`compute` returns, in the units of :mod:`~mixshare_layers.evaluation.metrics` (fractions in ``[0, 1]``;
    NLL, entropies and mutual information in nats per sample; Brier summed over classes, in ``[0, 2]``):

    - ``count``, ``ensemble_acc``, ``individual_acc`` (list of M), ``mean_individual_acc``, ``nll``, ``ece``,
      ``brier``, ``disagreement``: as :class:`~mixshare_layers.evaluation.EnsembleMetrics`, for the tempered ensemble;
    - ``adaptive_ece``, ``classwise_ece``: :mod:`mixshare_layers.evaluation.calibration`;
    - ``aurc``: :func:`~mixshare_layers.evaluation.aurc` of the ``msp`` score;
    - ``mean_confidence``: mean top-1 probability of the ensemble (compare with ``ensemble_acc``);
    - ``entropy``, ``mutual_information``, ``expected_entropy``: means of those scores;
    - ``reliability``: ``{"count", "confidence", "accuracy"}``, lists over the equal-width bins (``None`` for an
      empty bin), the data of :func:`~mixshare_layers.evaluation.plot_reliability_diagram`;
    - ``rule``, ``temperature``, ``temperature_mode``.

    Example:
        >>> acc = UncertaintyMetrics(2, 10)
        >>> acc.update(torch.randn(64, 2, 10), torch.randint(10, (64,)))
        >>> out = acc.compute()
        >>> sorted(k for k, v in out.items() if isinstance(v, float))[:6]
        ['adaptive_ece', 'aurc', 'brier', 'classwise_ece', 'disagreement', 'ece']
    """

    def __init__(
        self,
        num_subnetworks: int,
        num_classes: int,
        rule: str = "prob",
        *,
        temperature: float = 1.0,
        temperature_mode: str = "ensemble",
        num_bins: int = ECE_BINS,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_subnetworks = check_int("num_subnetworks", num_subnetworks, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.rule = check_choice("rule", rule, ENSEMBLE_RULES)
        self.temperature = check_real("temperature", temperature, low=0.0, low_inclusive=False)
        self.temperature_mode = check_choice("temperature_mode", temperature_mode, TEMPERATURE_MODES)
        self.num_bins = check_int("num_bins", num_bins, minimum=1)
        self.device = torch.device("cpu" if device is None else device)
        self.dtype = accumulation_dtype(self.device)
        self.ensemble = EnsembleMetrics(self.num_subnetworks, rule, num_bins=self.num_bins, device=self.device)
        self.reset()

    def __repr__(self) -> str:
        return (
            f"UncertaintyMetrics(num_subnetworks={self.num_subnetworks}, num_classes={self.num_classes}, "
            f"rule={self.rule!r}, temperature={self.temperature:g}, temperature_mode={self.temperature_mode!r}, "
            f"num_bins={self.num_bins})"
        )

    def reset(self) -> None:
        """Forget every sample."""
        self.ensemble.reset()
        self.classwise = torch.zeros(3, self.num_classes, self.num_bins, dtype=self.dtype, device=self.device)
        self._records: list[Tensor] = []  # (B, 2 + len(UNCERTAINTY_SCORES)): confidence, error, scores

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add a batch: the members' ``logits`` ``(B, M, K)`` and the labels ``targets`` ``(B,)``."""
        _check_logits_targets(logits, targets)
        m, k = logits.shape[1], logits.shape[2]
        if m != self.num_subnetworks or k != self.num_classes:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match num_subnetworks={self.num_subnetworks} and "
                f"num_classes={self.num_classes}"
            )
        targets = targets.to(logits.device)
        log_p, _ = tempered_log_probs(logits, self.rule, self.temperature, self.temperature_mode)
        self.ensemble.update(logits, targets, log_probs=log_p)  # member accuracies, disagreement: arg-max only
        probs = log_p.exp()
        self.classwise += classwise_calibration_bins(probs, targets, self.num_bins).to(self.device)
        conf, pred = probs.max(dim=1)
        scores = uncertainty_scores(
            logits, self.rule, temperature=self.temperature, temperature_mode=self.temperature_mode
        )
        columns = [conf, (pred != targets).to(conf.dtype), *(scores[name] for name in UNCERTAINTY_SCORES)]
        self._records.append(torch.stack(columns, dim=1).to(device=self.device, dtype=self.dtype))

    def _table(self) -> Tensor:
        width = 2 + len(UNCERTAINTY_SCORES)
        if not self._records:
            return torch.zeros(0, width, dtype=self.dtype, device=self.device)
        if len(self._records) > 1:
            self._records = [torch.cat(self._records)]
        return self._records[0]

    def sync(self, group: Any = None) -> None:
        """Bring the samples of every process of ``group`` (``torch.distributed``) into every process.

        Sums are all-reduced and the per-sample records all-gathered (rank order). A no-op without a process
        group. Call it once, after the last :meth:`update` and before :meth:`compute` / :meth:`scores`.
        """
        if distributed_world(group) == 1:
            return
        import torch.distributed as dist

        self.ensemble.all_reduce(group)
        dist.all_reduce(self.classwise, group=group)
        self._records = [all_gather_cat(self._table(), group)]

    def scores(self) -> dict[str, Tensor]:
        """Every sample's uncertainty scores so far, ``{name: (N,)}`` on :attr:`device` (for OOD detection)."""
        table = self._table()
        return {name: table[:, 2 + i] for i, name in enumerate(UNCERTAINTY_SCORES)}

    def compute(self) -> dict[str, Any]:
        """The metrics (see the class docstring) as Python numbers and lists."""
        out: dict[str, Any] = dict(self.ensemble.compute())
        table = self._table()
        n = table.shape[0]
        nan = math.nan
        out["adaptive_ece"] = (
            float(adaptive_calibration_error_from_confidences(table[:, 0], 1.0 - table[:, 1], self.num_bins))
            if n
            else nan
        )
        out["classwise_ece"] = float(classwise_calibration_error_from_bins(self.classwise)) if n else nan
        out["aurc"] = float(aurc(table[:, 2], table[:, 1])) if n >= 2 else nan
        means = table.mean(dim=0).tolist() if n else [nan] * table.shape[1]
        out["mean_confidence"] = means[0]
        for i, name in enumerate(UNCERTAINTY_SCORES):
            if name != "msp":
                out[name] = means[2 + i]
        out["reliability"] = self.reliability()
        out.update(rule=self.rule, temperature=self.temperature, temperature_mode=self.temperature_mode)
        return out

    def reliability(self) -> dict[str, list[Any]]:
        """Reliability-diagram data over the equal-width bins: ``count`` (samples), ``confidence`` and
        ``accuracy`` (means in the bin, ``None`` where the bin is empty)."""
        table = self._table()
        nb = self.num_bins
        sums = torch.zeros(3, nb, dtype=self.dtype, device=self.device)
        if table.shape[0]:
            conf = table[:, 0]
            idx = (conf * nb).ceil().long().sub_(1).clamp_(0, nb - 1)
            sums[0].index_add_(0, idx, torch.ones_like(conf))
            sums[1].index_add_(0, idx, conf)
            sums[2].index_add_(0, idx, 1.0 - table[:, 1])
        count, conf_sum, hits = sums.tolist()
        return {
            "count": [int(c) for c in count],
            "confidence": [s / c if c else None for s, c in zip(conf_sum, count, strict=True)],
            "accuracy": [h / c if c else None for h, c in zip(hits, count, strict=True)],
        }
