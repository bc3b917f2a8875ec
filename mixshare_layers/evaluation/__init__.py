"""Evaluation of an M-member ensemble: accuracy and calibration, OOD detection, selective prediction, shift.

* :mod:`~mixshare_layers.evaluation.metrics`: :class:`EnsembleMetrics` (accuracy, NLL, equal-width ECE, Brier,
  disagreement, streamed on device), :func:`collapsed_members`;
* :mod:`~mixshare_layers.evaluation.shift`: :func:`corrupt`, CIFAR-C-like corruptions made on the fly on the device;

* :func:`uncertainty_scores`: per-sample ``msp``, ``entropy``, ``mutual_information``, ``expected_entropy``;
* :func:`ood_detection_metrics`: AUROC, AUPR, FPR95 (OOD = positive, tie-aware);
* :func:`aurc` / :func:`risk_coverage_curve`: selective prediction;
* :func:`adaptive_calibration_error`, :func:`classwise_calibration_error` (the equal-width ECE is in
  :mod:`mixshare_layers.evaluation.metrics`);
* :func:`fit_temperature` / :func:`tempered_log_probs`: temperature scaling of the ensemble on a validation split;
* :class:`UncertaintyMetrics`: all of it, streamed over batches, on device;
* :func:`evaluate_uncertainty`: clean, OOD and corrupted test sets (:mod:`~mixshare_layers.evaluation.shift`) in one
  call, :func:`flatten_report` for CSV rows, :func:`calibration_under_shift` for the ECE per shift, raw and
  calibrated;
* :func:`plot_reliability_diagram`, :func:`plot_uncertainty_report`: figures (``analysis`` extra: matplotlib).

Units everywhere (:data:`METRIC_UNITS`): accuracies, calibration errors, AURC, AUROC, AUPR, FPR95 and disagreement
are fractions in ``[0, 1]``; NLL, entropies and mutual information are nats per sample. Every function takes the
ensemble rule: ``"prob"`` (mean of member probabilities; MIMO, torch-uncertainty) or ``"logit"`` (mean of logits;
MixMo's code).
"""

from .accumulator import UncertaintyMetrics
from .calibration import (
    adaptive_calibration_error,
    adaptive_calibration_error_from_confidences,
    classwise_calibration_bins,
    classwise_calibration_error,
    classwise_calibration_error_from_bins,
)
from .cost import inference_ms_per_image
from .evaluate import (
    METRIC_UNITS,
    calibration_under_shift,
    evaluate_uncertainty,
    flatten_report,
    shift_cells,
)
from .metrics import (
    ECE_BINS,
    EnsembleMetrics,
    brier_score,
    calibration_bins,
    collapsed_members,
    disagreement,
    expected_calibration_error,
)
from .ood import ood_detection_metrics
from .plots import plot_reliability_diagram, plot_uncertainty_report  # matplotlib itself is imported on first use
from .report import (
    collapse_warning,
    results_table,
    shift_rows,
    shift_summary,
    shift_table,
    summary_metrics,
    write_csv,
    write_shift_report,
)
from .scores import UNCERTAINTY_SCORES, entropy, uncertainty_scores
from .selective import aurc, risk_coverage_curve
from .shift import CORRUPTIONS, SEVERITIES, SEVERITY_PARAMETERS, Corruption, corrupt
from .temperature import TEMPERATURE_MODES, fit_temperature, tempered_log_probs

__all__ = [
    "CORRUPTIONS",
    "ECE_BINS",
    "METRIC_UNITS",
    "SEVERITIES",
    "SEVERITY_PARAMETERS",
    "TEMPERATURE_MODES",
    "UNCERTAINTY_SCORES",
    "Corruption",
    "EnsembleMetrics",
    "UncertaintyMetrics",
    "adaptive_calibration_error",
    "adaptive_calibration_error_from_confidences",
    "aurc",
    "brier_score",
    "calibration_bins",
    "calibration_under_shift",
    "classwise_calibration_bins",
    "classwise_calibration_error",
    "classwise_calibration_error_from_bins",
    "collapse_warning",
    "collapsed_members",
    "corrupt",
    "disagreement",
    "entropy",
    "evaluate_uncertainty",
    "expected_calibration_error",
    "fit_temperature",
    "flatten_report",
    "inference_ms_per_image",
    "ood_detection_metrics",
    "plot_reliability_diagram",
    "plot_uncertainty_report",
    "results_table",
    "risk_coverage_curve",
    "shift_cells",
    "shift_rows",
    "shift_summary",
    "shift_table",
    "summary_metrics",
    "tempered_log_probs",
    "uncertainty_scores",
    "write_csv",
    "write_shift_report",
]
