"""Figures of uncertainty results: the reliability diagram and a one-page summary of a report, headless.

Needs matplotlib (``pip install "mixshare-layers[analysis]"``), imported on first use; figures are drawn with
matplotlib's object API on the Agg canvas and every file is written atomically (as :mod:`mixshare_layers.analysis`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._checks import check_choice
from ..figures import PLOT_FORMATS, SUBNETWORK_COLORS, require_matplotlib
from ..files import save_figure

__all__ = ["OOD_SCORES", "plot_reliability_diagram", "plot_uncertainty_report"]

#: the OOD scores the summary figure shows: the ones the printed tables and ``ood.csv`` report
OOD_SCORES = ("msp", "entropy", "mutual_information")
OOD_SCORE_LABELS = {"msp": "max probability", "entropy": "entropy", "mutual_information": "mutual information"}


def _reliability(data: Mapping[str, Any]) -> Mapping[str, Any]:
    rel = data.get("reliability", data)
    if not isinstance(rel, Mapping) or not {"count", "confidence", "accuracy"} <= set(rel):
        raise ValueError(
            "expected the metrics of UncertaintyMetrics.compute() (with a 'reliability' entry) or their "
            f"'reliability' dict with 'count', 'confidence' and 'accuracy', but got keys {sorted(data)}"
        )
    return rel


def _formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    fmts = (formats,) if isinstance(formats, str) else tuple(formats)
    for fmt in fmts:
        check_choice("formats", fmt, PLOT_FORMATS)
    if not fmts:
        raise ValueError("formats must name at least one of 'png', 'svg', 'pdf', but got an empty sequence")
    return fmts


def _draw_reliability(ax: Any, rel: Mapping[str, Any], label: str, color: str) -> None:
    """Bars of each non-empty bin's accuracy (darker for fuller bins) and red segments from the bin's mean confidence
    (on the diagonal) to its accuracy, in percent."""
    nb = len(rel["count"])
    width = 100.0 / nb
    total = max(sum(rel["count"]), 1)
    first = True
    for b, (count, conf, acc) in enumerate(zip(rel["count"], rel["confidence"], rel["accuracy"], strict=True)):
        if not count:
            continue
        ax.bar(b * width + width / 2, 100 * acc, width=width, color=color, alpha=0.35 + 0.6 * count / total,
               label=f"{label} (darker: more images)" if first else None)  # fmt: skip
        ax.plot([100 * conf, 100 * conf], [100 * conf, 100 * acc], color="#d62728", linewidth=1.0,
                label="gap to the diagonal" if first else None)  # fmt: skip
        first = False


def _draw_calibrated(ax: Any, rel: Mapping[str, Any], label: str) -> None:
    """The calibrated bins as black points at (mean confidence, accuracy), joined, drawn over the bars."""
    points = [(100 * conf, 100 * acc) for count, conf, acc in zip(rel["count"], rel["confidence"], rel["accuracy"],
              strict=True) if count]  # fmt: skip
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color="#000000", linewidth=1.2, marker="o", markersize=3.5, markerfacecolor="#ffffff",
                label=label, zorder=5)  # fmt: skip


def plot_reliability_diagram(
    metrics: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    calibrated: Mapping[str, Any] | None = None,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    figsize: tuple[float, float] = (4.2, 4.2),
    dpi: int = 110,
) -> list[Path]:
    """Draw the reliability diagram of an ensemble: accuracy per equal-width confidence bin against the diagonal.

    Bars give each bin's accuracy (darker for fuller bins), red segments the gap from the bin's mean confidence
    (on the diagonal) to its accuracy; ``calibrated`` adds the temperature-scaled bins as black points at their
    (mean confidence, accuracy). Axes and title are in percent (ECE, adaptive ECE, accuracy).

    Args:
        metrics: :meth:`UncertaintyMetrics.compute` output (or its ``"reliability"`` dict).
        path: output path *without* extension; parent folders are created.
        calibrated: the same for the temperature-scaled ensemble (optional).
        title: figure title.
        formats: any of ``"png"``, ``"svg"``, ``"pdf"``.
        figsize: figure size in inches.
        dpi: resolution of raster formats.

    Returns:
        The written files, one per format.

    Example:
        >>> import tempfile, torch
        >>> from mixshare_layers.evaluation import UncertaintyMetrics
        >>> acc = UncertaintyMetrics(2, 5)
        >>> acc.update(torch.randn(200, 2, 5), torch.randint(5, (200,)))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     [p.suffix for p in plot_reliability_diagram(acc.compute(), f"{folder}/rel")]
        ['.png']
    """
    _reliability(metrics)  # checks the input before anything is drawn
    fmts = _formats(formats)
    figure_cls, canvas_cls = require_matplotlib()
    fig = figure_cls(figsize=figsize, dpi=dpi)
    canvas_cls(fig)
    ax = fig.add_subplot(1, 1, 1)
    _reliability_axes(ax, metrics, calibrated, title)
    fig.tight_layout()
    return save_figure(fig, path, fmts)


def _reliability_axes(
    ax: Any, metrics: Mapping[str, Any], calibrated: Mapping[str, Any] | None, title: str | None
) -> None:
    ax.plot([0, 100], [0, 100], color="#7f7f7f", linestyle="--", linewidth=0.8, label="perfect calibration")
    _draw_reliability(ax, _reliability(metrics), "accuracy per bin", SUBNETWORK_COLORS[1])
    if calibrated is not None:
        t = calibrated.get("temperature")
        _draw_calibrated(ax, _reliability(calibrated), f"calibrated, T = {t:.3g}" if t else "calibrated")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("confidence, top-1 probability (%)")
    ax.set_ylabel("accuracy (%)")
    parts = []
    for key, name in (("ece", "ECE"), ("adaptive_ece", "aECE"), ("ensemble_acc", "acc")):
        if isinstance(metrics.get(key), float):
            parts.append(f"{name} {100 * metrics[key]:.2f}%")
    heading = ", ".join(parts)
    if calibrated is not None and isinstance(calibrated.get("ece"), float):
        heading += f"\ncalibrated: ECE {100 * calibrated['ece']:.2f}%"
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=8)
    ax.legend(fontsize=6, loc="upper left", frameon=False)
    ax.tick_params(labelsize=7)


def plot_uncertainty_report(
    report: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    figsize: tuple[float, float] = (12.0, 3.8),
    dpi: int = 110,
) -> list[Path]:
    """One figure summarising a report of :func:`~mixshare_layers.evaluation.evaluate_uncertainty`.

    Panels, every value in percent: the clean reliability diagram (with the calibrated one when the report has a
    temperature); accuracy and ECE against the corruption severity (0 = clean), one line per corruption and their
    mean in black (when the report has shifts); OOD AUROC of the scores the report's tables print (:data:`OOD_SCORES`),
    per OOD set (when it has OOD sets).

    Args:
        report: the dict :func:`~mixshare_layers.evaluation.evaluate_uncertainty` returned.
        path: output path *without* extension; parent folders are created.
        title: figure title.
        formats: any of ``"png"``, ``"svg"``, ``"pdf"``.
        figsize: figure size in inches.
        dpi: resolution of raster formats.

    Returns:
        The written files, one per format.
    """
    if not isinstance(report, Mapping) or "clean" not in report:
        raise ValueError("report must be the dict evaluate_uncertainty returned (it has no 'clean' entry)")
    fmts = _formats(formats)
    figure_cls, canvas_cls = require_matplotlib()
    shift = report.get("shift") or {}
    ood = report.get("ood") or {}
    panels = 1 + (2 if shift else 0) + (1 if ood else 0)
    fig = figure_cls(figsize=(figsize[0] * panels / 4, figsize[1]), dpi=dpi)
    canvas_cls(fig)
    calibrated = report.get("calibrated")
    cal_clean = dict(calibrated["clean"], temperature=report.get("temperature")) if calibrated else None
    ax = fig.add_subplot(1, panels, 1)
    _reliability_axes(ax, report["clean"], cal_clean, "clean test set")
    col = 2
    if shift:
        for key, label in (("ensemble_acc", "accuracy"), ("ece", "ECE")):
            ax = fig.add_subplot(1, panels, col)
            col += 1
            clean_value = report["clean"][key]
            for i, (corruption, by_sev) in enumerate(shift.items()):
                sev = sorted(by_sev)
                ax.plot(
                    [0, *sev],
                    [100 * clean_value, *(100 * by_sev[s][key] for s in sev)],
                    color=SUBNETWORK_COLORS[i % len(SUBNETWORK_COLORS)],
                    linewidth=1.0,
                    marker=".",
                    label=corruption,
                )
            mean = report.get("shift_by_severity") or {}
            sev = sorted(mean)
            means = [100 * clean_value, *(100 * mean[s][key] for s in sev)]
            ax.plot([0, *sev], means, color="#000000", linewidth=2.0, label="mean")
            ax.set_xlabel("severity (0 = clean)")
            ax.set_ylabel(f"{label} (%)")
            ax.set_title(f"{label} under corruptions", fontsize=9)
            ax.tick_params(labelsize=7)
            if key == "ensemble_acc":
                ax.legend(fontsize=6, frameon=False)
    if ood:
        ax = fig.add_subplot(1, panels, col)
        names = list(ood)
        scores = [s for s in OOD_SCORES if s in next(iter(ood.values()))]
        height = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            ys = [i + j * height for i in range(len(scores))]
            ax.barh(ys, [100 * ood[name][s]["auroc"] for s in scores], height=height, label=name,
                    color=SUBNETWORK_COLORS[j % len(SUBNETWORK_COLORS)])  # fmt: skip
        ax.axvline(50, color="#7f7f7f", linestyle="--", linewidth=0.8, label="chance")
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(scores))])
        ax.set_yticklabels([OOD_SCORE_LABELS[s] for s in scores], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("AUROC (%)")
        ax.set_title("OOD detection", fontsize=9)
        ax.legend(fontsize=6, frameon=False, loc="lower right")
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, fmts)
