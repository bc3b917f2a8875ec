"""Figures of uncertainty results: the reliability diagram and a one-page summary of a report, headless.

Needs matplotlib (``pip install "mixshare-layers[analysis]"``), imported on first use; figures are drawn with
matplotlib's object API on the Agg canvas and every file is written atomically (as :mod:`mixshare_layers.analysis`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .._checks import check_choice
from .._files import atomic_write
from ..analysis.plots import PLOT_FORMATS, SUBNETWORK_COLORS, _require_matplotlib

__all__ = ["plot_reliability_diagram", "plot_uncertainty_report"]


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


def _save(fig: Any, path: str | os.PathLike[str], formats: tuple[str, ...]) -> list[Path]:
    stem = Path(path)
    written = []
    for fmt in formats:
        target = stem.with_name(stem.name + "." + fmt)
        metadata = {"Date": None} if fmt == "svg" else None  # reproducible SVG files

        def save(fh: IO[bytes], fmt: str = fmt, metadata: dict[str, None] | None = metadata) -> None:
            fig.savefig(fh, format=fmt, metadata=metadata)

        written.append(atomic_write(target, save))
    return written


def _draw_reliability(ax: Any, rel: Mapping[str, Any], label: str, color: str, outline: bool = False) -> None:
    """Bars (or, with ``outline``, flat steps) of each non-empty bin's accuracy; red gap segments for bars."""
    nb = len(rel["count"])
    width = 1.0 / nb
    total = max(sum(rel["count"]), 1)
    labelled = False
    for b, (count, conf, acc) in enumerate(zip(rel["count"], rel["confidence"], rel["accuracy"], strict=True)):
        if not count:
            continue
        left = b * width
        tag = None if labelled else label
        labelled = True
        if outline:
            ax.plot([left, left + width], [acc, acc], color=color, linewidth=1.6, label=tag)
        else:
            ax.bar(left + width / 2, acc, width=width, color=color, alpha=0.35 + 0.6 * count / total, label=tag)
            ax.plot([conf, conf], [conf, acc], color="#d62728", linewidth=1.0)  # the gap to the diagonal


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
    (on the diagonal) to its accuracy; ``calibrated`` adds the temperature-scaled accuracies as black steps. The
    title gives the ECE, the adaptive ECE and the accuracy, in percent.

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
        >>> from mixshare_layers.uncertainty import UncertaintyMetrics
        >>> acc = UncertaintyMetrics(2, 5)
        >>> acc.update(torch.randn(200, 2, 5), torch.randint(5, (200,)))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     [p.suffix for p in plot_reliability_diagram(acc.compute(), f"{folder}/rel")]
        ['.png']
    """
    _reliability(metrics)  # checks the input before anything is drawn
    fmts = _formats(formats)
    figure_cls, canvas_cls = _require_matplotlib()
    fig = figure_cls(figsize=figsize, dpi=dpi)
    canvas_cls(fig)
    ax = fig.add_subplot(1, 1, 1)
    _reliability_axes(ax, metrics, calibrated, title)
    fig.tight_layout()
    return _save(fig, path, fmts)


def _reliability_axes(
    ax: Any, metrics: Mapping[str, Any], calibrated: Mapping[str, Any] | None, title: str | None
) -> None:
    ax.plot([0, 1], [0, 1], color="#7f7f7f", linestyle="--", linewidth=0.8)
    _draw_reliability(ax, _reliability(metrics), "accuracy per bin", SUBNETWORK_COLORS[1])
    if calibrated is not None:
        t = calibrated.get("temperature")
        _draw_reliability(
            ax, _reliability(calibrated), f"calibrated (T = {t:.3g})" if t else "calibrated", "#000000", outline=True
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    parts = []
    for key, name in (("ece", "ECE"), ("adaptive_ece", "aECE"), ("ensemble_acc", "acc")):
        if isinstance(metrics.get(key), float):
            parts.append(f"{name} {100 * metrics[key]:.2f}%")
    heading = ", ".join(parts)
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    ax.tick_params(labelsize=7)


def plot_uncertainty_report(
    report: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    formats: Sequence[str] = ("png",),
    figsize: tuple[float, float] = (11.0, 3.4),
    dpi: int = 110,
) -> list[Path]:
    """One figure summarising a report of :func:`~mixshare_layers.uncertainty.evaluate_uncertainty`.

    Panels: the clean reliability diagram (with the calibrated one when the report has a temperature); accuracy
    and ECE against the corruption severity (0 = clean), one line per corruption and their mean in black (when the
    report has shifts); OOD AUROC per score and OOD set (when it has OOD sets).

    Args:
        report: the dict :func:`~mixshare_layers.uncertainty.evaluate_uncertainty` returned.
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
    figure_cls, canvas_cls = _require_matplotlib()
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
                    [clean_value, *(by_sev[s][key] for s in sev)],
                    color=SUBNETWORK_COLORS[i % len(SUBNETWORK_COLORS)],
                    linewidth=1.0,
                    marker=".",
                    label=corruption,
                )
            mean = report.get("shift_by_severity") or {}
            sev = sorted(mean)
            means = [clean_value, *(mean[s][key] for s in sev)]
            ax.plot([0, *sev], means, color="#000000", linewidth=2.0, label="mean")
            ax.set_xlabel("severity (0 = clean)")
            ax.set_ylabel(f"{label} (fraction)")
            ax.set_title(f"{label} under corruptions", fontsize=9)
            ax.tick_params(labelsize=7)
            if key == "ensemble_acc":
                ax.legend(fontsize=6, frameon=False)
    if ood:
        ax = fig.add_subplot(1, panels, col)
        names = list(ood)
        scores = list(next(iter(ood.values())))
        width = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            xs = [i + j * width for i in range(len(scores))]
            ax.bar(xs, [ood[name][s]["auroc"] for s in scores], width=width, label=name,
                   color=SUBNETWORK_COLORS[j % len(SUBNETWORK_COLORS)])  # fmt: skip
        ax.axhline(0.5, color="#7f7f7f", linestyle="--", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(scores))])
        ax.set_xticklabels([s.replace("_", "\n") for s in scores], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("AUROC (fraction)")
        ax.set_title("OOD detection", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, fmts)
