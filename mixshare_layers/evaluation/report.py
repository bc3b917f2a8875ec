"""What a training run reports: its summary (``summary.json``), the end-of-run tables (one run, or runs side by side),
the shift files and the member-health warning; the log as it trains (:class:`RunLog`, :class:`Progress`, the
metrics.csv columns) lives in :mod:`~mixshare_layers.evaluation.runlog` and is re-exported here.

The metrics of :mod:`mixshare_layers.evaluation` are fractions and nats per sample (:data:`METRIC_UNITS`). What
people read shows one unit per kind of quantity, in the name: accuracies, ECE, disagreement, confidence, AUROC /
AUPR / FPR95 and sharing rates in percent (``_pct``), NLL and entropies in nats per image (``_nats``), Brier as is
(in ``[0, 2]``). CSV cells keep 4 significant digits. A run's ``summary.json`` follows the same convention: every
key names its unit (:func:`summary_metrics`; :data:`SUMMARY_RENAMED` maps the keys of summaries written before).

Example:
    >>> metrics = {"ensemble_acc": 0.5, "mean_individual_acc": 0.45, "individual_acc": [0.5, 0.4], "nll": 1.2,
    ...            "ece": 0.031, "brier": 0.6, "disagreement": 0.25, "mean_confidence": 0.52}
    >>> summary = summary_metrics(metrics)
    >>> summary["ensemble_acc_pct"], summary["ece_pct"], summary["nll_nats"]
    (50.0, 3.1, 1.2)
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import write_json
from .evaluate import shift_cells
from .plots import plot_uncertainty_report
from .runlog import (
    EVAL_COLUMNS,
    SHARING_KEYS,
    Progress,
    RunLog,
    csv_cell,
    epoch_columns,
    epoch_line,
    metrics_columns,
    tensorboard_scalars,
    write_csv,
)

__all__ = [
    "EVAL_COLUMNS",
    "OOD_COLUMNS",
    "OOD_SCORES",
    "SHARING_KEYS",
    "SHIFT_COLUMNS",
    "SUMMARY_RENAMED",
    "Progress",
    "RunLog",
    "collapse_warning",
    "comparison_table",
    "csv_cell",
    "epoch_columns",
    "epoch_line",
    "finite",
    "metrics_columns",
    "renamed_summary",
    "results_table",
    "run_summary",
    "sharing_entries",
    "shift_rows",
    "shift_summary",
    "shift_table",
    "summary_metrics",
    "tensorboard_scalars",
    "write_csv",
    "write_shift_report",
]

SHIFT_COLUMNS = (
    *EVAL_COLUMNS[:4],
    ("adaptive_ece", "adaptive_ece_pct", 100.0),
    ("brier", "brier", 1.0),
    ("aurc", "aurc_pct", 100.0),
    ("mean_confidence", "mean_confidence_pct", 100.0),
    ("disagreement", "disagreement_pct", 100.0),
    ("mutual_information", "mutual_information_nats", 1.0),
)
OOD_SCORES = (("msp", "max probability"), ("entropy", "entropy"), ("mutual_information", "mutual information"))
OOD_COLUMNS = (("auroc", "auroc_pct"), ("aupr", "aupr_pct"), ("fpr95", "fpr95_pct"))
_SUMMARY_PERCENT = ("ensemble_acc", "mean_individual_acc", "disagreement", "mean_confidence")


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None and every key made a string, at any depth (strict
    JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def summary_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A run summary's metrics from evaluation metrics, each key naming its unit: ``ensemble_acc_pct``,
    ``mean_individual_acc_pct``, ``individual_acc_pct`` (a list), ``disagreement_pct``, ``mean_confidence_pct``,
    ``ece_pct`` (percent), ``nll_nats`` (nats per image) and ``brier`` (as is, in ``[0, 2]``)."""
    out: dict[str, Any] = {f"{key}_pct": 100.0 * metrics[key] for key in _SUMMARY_PERCENT}
    out["individual_acc_pct"] = [100.0 * a for a in metrics["individual_acc"]]
    out.update(nll_nats=metrics["nll"], ece_pct=100.0 * metrics["ece"], brier=metrics["brier"])
    return out


#: the keys of run summaries written before they named their units, and their names now (``ece`` was a fraction,
#: ``ece_pct`` is percent: :func:`renamed_summary` converts)
SUMMARY_RENAMED = {
    **{key: f"{key}_pct" for key in (*_SUMMARY_PERCENT, "individual_acc", *SHARING_KEYS)},
    "nll": "nll_nats",
    "ece": "ece_pct",
}


def renamed_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A run summary with the keys of :data:`SUMMARY_RENAMED` renamed (``ece`` a fraction becomes ``ece_pct``);
    one already in today's names is returned as it is (a copy). Also inside its ``"val"`` entry."""
    out = {SUMMARY_RENAMED.get(k, k): v for k, v in summary.items()}
    if "ece" in summary and summary["ece"] is not None:
        out["ece_pct"] = 100.0 * summary["ece"]
    if isinstance(out.get("val"), Mapping):
        out["val"] = renamed_summary(out["val"])
    return out


def sharing_entries(rates: Mapping[str, float] | None) -> dict[str, float | None]:
    """The :data:`SHARING_KEYS` of :func:`mixshare_layers.analysis.sharing_rates`'s result (None where absent)."""
    rates = rates or {}
    return {key: rates.get(key.replace("_sharing", "")) for key in SHARING_KEYS}


def collapse_warning(
    split: str, member_acc: Sequence[float], collapsed: Sequence[int], num_classes: int
) -> str | None:
    """The warning for members that collapsed (:func:`~mixshare_layers.evaluation.collapsed_members`), None when
    every member is healthy. ``member_acc``: the members' accuracies, fractions."""
    if not collapsed:
        return None
    healthy = [i for i in range(len(member_acc)) if i not in collapsed]

    def listed(ids: Sequence[int], values: bool = False) -> str:
        return " / ".join(f"{100 * member_acc[i]:.2f}" for i in ids) if values else ", ".join(map(str, ids))

    return (
        f"WARNING: {split}: member(s) {listed(collapsed)} collapsed: accuracy {listed(collapsed, True)} % near "
        f"chance ({100 / num_classes:.2f} %) while member(s) {listed(healthy)} reached {listed(healthy, True)} %; the "
        "ensemble is carried by the healthy ones"
    )


def run_summary(
    evaluation: Mapping[str, Mapping[str, Any]], shift: Mapping[str, Any] | None = None, **run: Any
) -> dict[str, Any]:
    """A run's ``summary.json``: the ``"test"`` split's :func:`summary_metrics` with its ``collapsed_members`` and its
    sharing rates (``<SHARING_KEYS>_pct``, from its ``"sharing"`` entry), ``val`` (the ``"val"`` split's summary
    metrics, or None), ``shift`` (:func:`shift_summary`, or None), then the ``run`` entries (the run's settings,
    ``epochs``, ``steps``, ``train_time_s``, ...)."""
    test, val = evaluation["test"], evaluation.get("val")
    return {
        **summary_metrics(test),
        "collapsed_members": list(test["collapsed_members"]),
        **{f"{key}_pct": test["sharing"].get(key) for key in SHARING_KEYS},
        "val": summary_metrics(val) if val is not None else None,
        "shift": shift_summary(shift) if shift is not None else None,
        **run,
    }


def results_table(summary: Mapping[str, Any]) -> str:
    """The end-of-run table of a run's summary (:func:`run_summary`; its keys name their units)."""

    def rate(key: str) -> str:
        return "-" if summary.get(key) is None else f"{summary[key]:.1f}"

    rows = [
        ("method", summary["method"]),
        ("ensemble accuracy (%)", f"{summary['ensemble_acc_pct']:.2f}"),
        ("mean individual accuracy (%)", f"{summary['mean_individual_acc_pct']:.2f}"),
        ("individual accuracies (%)", " / ".join(f"{a:.2f}" for a in summary["individual_acc_pct"])),
        ("collapsed members", ", ".join(map(str, summary.get("collapsed_members") or [])) or "none"),
        ("mean confidence (%)", f"{summary['mean_confidence_pct']:.2f}"),
        (f"NLL (nats, rule {summary['ensemble_rule']})", f"{summary['nll_nats']:.4f}"),
        ("ECE (%, 15 bins)", f"{summary['ece_pct']:.2f}"),
        ("Brier (sum over classes)", f"{summary['brier']:.4f}"),
        ("disagreement (%)", f"{summary['disagreement_pct']:.2f}"),
        ("classifier sharing (%)", rate("classifier_sharing_pct")),
        ("encoder sharing (%)", rate("encoder_sharing_pct")),
        ("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
        ("train time (s), images/s", f"{summary['train_time_s']:.1f}, {summary['images_per_s']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 34 + "+"
    return "\n".join([line, *(f"| {k:<{width}} | {v:<32} |" for k, v in rows), line])


def comparison_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Runs side by side (e.g. the plain backbone and the MixShare network of the same recipe), one column per run:
    test accuracy of the ensemble and mean member, NLL and ECE at temperature 1 and at the fitted temperature,
    accuracy and ECE under corruption, OOD detection (max probability) and the cost of training and of one test
    pass. Rows a run has no value for (no shift evaluation, no temperature) show ``-``."""

    def get(s: Mapping[str, Any], *path: str) -> Any:
        for key in path:
            s = s.get(key) if isinstance(s, Mapping) else None  # type: ignore[assignment]
        return s

    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None else f"{value:{fmt}}"

    def ood(s: Mapping[str, Any]) -> Any:
        sets = get(s, "shift", "ood") or {}
        return get(sets[next(iter(sets))], "msp", "auroc_pct") if sets else None

    rows: list[tuple[str, Any, str]] = [
        ("ensemble accuracy (%)", lambda s: s["ensemble_acc_pct"], ".2f"),
        ("mean member accuracy (%)", lambda s: s["mean_individual_acc_pct"], ".2f"),
        ("NLL (nats)", lambda s: s["nll_nats"], ".3f"),
        ("NLL, calibrated (nats)", lambda s: get(s, "shift", "calibrated_clean", "nll_nats"), ".3f"),
        ("ECE (%)", lambda s: s["ece_pct"], ".2f"),
        ("ECE, calibrated (%)", lambda s: get(s, "shift", "calibrated_clean", "ece_pct"), ".2f"),
        ("temperature", lambda s: get(s, "shift", "temperature"), ".3f"),
        ("corrupted accuracy (%)", lambda s: get(s, "shift", "corruption_mean", "ensemble_acc_pct"), ".2f"),
        ("corrupted ECE, calibrated (%)", lambda s: get(s, "shift", "calibrated_corruption_mean", "ece_pct"), ".2f"),
        ("OOD AUROC, max prob. (%)", ood, ".2f"),
        ("parameters", lambda s: s.get("parameters"), ",d"),
        ("train time (s)", lambda s: s["train_time_s"], ".1f"),
        ("test pass (ms / image)", lambda s: s.get("test_ms_per_image"), ".3f"),
    ]
    names = [s["method"] + (f" (M = {s['num_subnetworks']})" if s["num_subnetworks"] > 1 else " network")
             for s in summaries]  # fmt: skip
    width, col = max(len(r[0]) for r in rows), max(14, *(len(n) for n in names))
    out = [f"{'':<{width}}  " + "  ".join(f"{n:>{col}}" for n in names)]
    out += [f"{label:<{width}}  " + "  ".join(f"{cell(read(s), fmt):>{col}}" for s in summaries)
            for label, read, fmt in rows]  # fmt: skip
    return "\n".join(out)


def shift_rows(report: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of shift.csv (clean, each corruption and severity, the means per severity and over all) and of
    ood.csv (set x score) of an :func:`~mixshare_layers.evaluation.evaluate_uncertainty` report, at temperature 1
    and, when the report has one, at the fitted temperature."""
    shift: list[dict[str, Any]] = []
    ood: list[dict[str, Any]] = []
    parts = [(1.0, report)]
    if report.get("calibrated") is not None:
        parts.append((report["temperature"], report["calibrated"]))
    for temperature, rep in parts:
        for name, severity, metrics in shift_cells(rep):
            row = {"shift": name, "severity": severity, "temperature": temperature}
            shift.append(row | {col: factor * metrics[key] for key, col, factor in SHIFT_COLUMNS if key in metrics})
        for name, scores in rep["ood"].items():
            for score, _ in OOD_SCORES:
                row = {"ood_set": name, "score": score, "temperature": temperature}
                ood.append(row | {col: 100.0 * scores[score][key] for key, col in OOD_COLUMNS})
    return shift, ood


def shift_table(report: Mapping[str, Any], ood_name: str | None = None) -> str:
    """The printed digest of a shift report: accuracy, NLL, ECE and confidence per shift (temperature 1), with the
    ECE at the fitted temperature beside it when the report has one; OOD detection per score; the temperature."""
    calibrated = report.get("calibrated")

    def line(name: str, m: Mapping[str, Any], cal: Mapping[str, Any] | None) -> str:
        acc, ece, conf = 100 * m["ensemble_acc"], 100 * m["ece"], 100 * m["mean_confidence"]
        return f"  {name:<22} {acc:8.2f} {m['nll']:7.3f} {ece:8.2f} {conf:9.2f}" + (
            f" {100 * cal['ece']:13.2f}" if cal is not None else "")  # fmt: skip

    def cal_of(*path: Any) -> Mapping[str, Any] | None:
        node: Any = calibrated
        for key in path:
            node = node[key] if node is not None else None
        return node

    lines = [f"distribution shift (test set, corrupted on the fly; rule {report['rule']}):"]
    lines.append(f"  {'shift':<22} {'acc (%)':>8} {'NLL':>7} {'ECE (%)':>8} {'conf (%)':>9}"
                 + (f" {'ECE cal. (%)':>13}" if calibrated is not None else ""))  # fmt: skip
    lines.append(line("clean", report["clean"], cal_of("clean")))
    for corruption, by_severity in report["shift"].items():
        lines += [line(f"{corruption} {severity}", m, cal_of("shift", corruption, severity))
                  for severity, m in by_severity.items()]  # fmt: skip
    if report["shift_mean"]:
        lines.append(line("mean over corruptions", report["shift_mean"], cal_of("shift_mean")))
    for name, scores in report["ood"].items():
        lines.append(f"OOD detection: {ood_name or name} images (positives) against the test set:")
        lines.append(f"  {'score':<22} {'AUROC (%)':>10} {'AUPR (%)':>9} {'FPR95 (%)':>10}")
        for score, label in OOD_SCORES:
            r = scores[score]
            lines.append(f"  {label:<22} {100 * r['auroc']:10.2f} {100 * r['aupr']:9.2f} {100 * r['fpr95']:10.2f}")
    if report.get("temperature") is not None:
        cal = report["calibrated"]["clean"]
        source = {"model": "the model's own", "val": "fitted on the validation split", "given": "given"}.get(
            str(report.get("temperature_source")), "fitted")  # fmt: skip
        lines.append(
            f"temperature {report['temperature']:.3f} ({source}): clean NLL {cal['nll']:.3f}, "
            f"ECE {100 * cal['ece']:.2f} %"
        )
    return "\n".join(lines)


def shift_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """A run summary's digest of a shift report: ``clean``, ``corruption_mean`` and ``calibrated_clean`` as
    ``{ensemble_acc_pct, mean_individual_acc_pct, nll_nats, ece_pct}`` (and ``calibrated_corruption_mean``),
    ``ood`` as ``{set: {score: {auroc_pct, aupr_pct, fpr95_pct}}}``, and the ``temperature`` (None without
    one)."""

    def digest(m: Mapping[str, Any]) -> dict[str, Any]:
        return {col: factor * m[key] for key, col, factor in SHIFT_COLUMNS[:4] if key in m}

    ood = {
        name: {score: {col: 100.0 * scores[score][key] for key, col in OOD_COLUMNS} for score, _ in OOD_SCORES}
        for name, scores in report["ood"].items()
    }
    calibrated = report.get("calibrated")
    return finite(
        {
            "clean": digest(report["clean"]),
            "corruption_mean": digest(report["shift_mean"]) if report["shift_mean"] else None,
            "ood": ood,
            "temperature": report.get("temperature"),
            "calibrated_clean": digest(calibrated["clean"]) if calibrated else None,
            "calibrated_corruption_mean": digest(calibrated["shift_mean"])
            if calibrated and calibrated["shift_mean"]
            else None,
        }
    )


SHIFT_CSV = ["shift", "severity", "temperature", *(col for _, col, _ in SHIFT_COLUMNS)]
OOD_CSV = ["ood_set", "score", "temperature", *(col for _, col in OOD_COLUMNS)]


def write_shift_report(
    folder: str | os.PathLike[str], report: Mapping[str, Any], *, title: str | None = None, **extra: Any
) -> list[Path]:
    """Write a shift report into ``folder``, every file atomically; returns the files.

    ``uncertainty.json``: the report and the ``extra`` entries (fractions and nats, as its ``units`` say; strict
    JSON), ``shift.csv`` and ``ood.csv`` (:func:`shift_rows`; the latter only with OOD sets) and, when matplotlib
    is installed, ``uncertainty.png`` (:func:`~mixshare_layers.evaluation.plot_uncertainty_report`).
    """
    folder = Path(folder)
    written = [write_json(folder / "uncertainty.json", finite({**report, **extra}))]
    rows, ood_rows = shift_rows(report)
    written.append(write_csv(folder / "shift.csv", SHIFT_CSV, rows))
    if ood_rows:
        written.append(write_csv(folder / "ood.csv", OOD_CSV, ood_rows))
    if importlib.util.find_spec("matplotlib") is not None:
        written += plot_uncertainty_report(report, folder / "uncertainty", title=title)
    return written
