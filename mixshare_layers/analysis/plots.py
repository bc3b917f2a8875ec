"""The paper's overlapping influence histograms (Fig. 3, 5 and 6), headless.

Needs matplotlib (``pip install "mixshare-layers[analysis]"``). Figures are drawn with matplotlib's object API on
the Agg canvas: nothing touches pyplot's global state or needs a display, and every file is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .._checks import check_choice
from ..figures import OVERLAP_COLOR, PLOT_FORMATS, SUBNETWORK_COLORS, require_matplotlib
from ..files import save_figure
from .sharing import _check_influence, sharing_rate

__all__ = ["OVERLAP_COLOR", "PLOT_FORMATS", "SORT_ORDERS", "SUBNETWORK_COLORS", "feature_order", "plot_influence"]

SORT_ORDERS = ("owner", "sharing", "none")


def feature_order(influence: Tensor, sort: str = "owner") -> Tensor:
    """The order in which features are drawn, ``(F,)`` int64.

    Args:
        influence: ``(M, F)`` influence table.
        sort: ``"owner"`` groups the features by the subnetwork that uses them most (subnetwork 0's first), each
            group by decreasing influence on its owner: private features form one block per subnetwork, as in the
            paper's figures. ``"sharing"`` orders by increasing per-feature ``min / max`` ratio (private first,
            shared last). ``"none"`` keeps the features' own order.
    """
    h = _check_influence(influence).double().abs()
    check_choice("sort", sort, SORT_ORDERS)
    f = h.shape[1]
    if sort == "none":
        return torch.arange(f)
    high, owner = h.max(dim=0)
    if sort == "sharing":
        ratio = torch.where(high > 0, h.min(dim=0).values / high.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
        return torch.argsort(ratio, stable=True)
    scale = high.max().clamp_min(torch.finfo(torch.float64).tiny)
    key = owner.double() * 4.0 - high / scale  # owner first, then decreasing influence (|high / scale| <= 1)
    return torch.argsort(key, stable=True)


def plot_influence(
    influence: Tensor,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    ylabel: str = "influence",
    xlabel: str = "feature (sorted)",
    sort: str = "owner",
    formats: Sequence[str] = ("png", "svg"),
    figsize: tuple[float, float] = (7.0, 2.6),
    dpi: int = 110,
) -> list[Path]:
    """Draw the M influence histograms of one quantity on top of each other, with their overlap in its own colour.

    One bar per feature and subnetwork (subnetwork i in ``SUBNETWORK_COLORS[i]``, semi-transparent) and, on top,
    the overlap ``min_i h_i(f)`` in :data:`OVERLAP_COLOR`: a private feature shows one tall coloured bar and a small
    orange one, a shared feature an orange bar of nearly full height. The title gives both sharing rates.

    Args:
        influence: ``(M, F)`` influence of F features on M >= 2 subnetworks.
        path: output path *without* extension (``.png`` / ``.svg`` are appended); parent folders are created.
        title: figure title (the sharing rates are appended).
        ylabel: y-axis label.
        xlabel: x-axis label.
        sort: feature order, see :func:`feature_order`.
        formats: file formats, any of ``"png"``, ``"svg"``, ``"pdf"``.
        figsize: figure size in inches.
        dpi: resolution of raster formats.

    Returns:
        The written files, one per format.

    Example:
        >>> import tempfile
        >>> h = torch.tensor([[3.0, 0.1, 1.0], [0.2, 2.0, 1.0]])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     [p.suffix for p in plot_influence(h, f"{folder}/toy", title="toy")]
        ['.png', '.svg']
    """
    h = _check_influence(influence).detach().double().abs().cpu()
    check_choice("sort", sort, SORT_ORDERS)
    if isinstance(formats, str):
        formats = (formats,)
    for fmt in formats:
        check_choice("formats", fmt, PLOT_FORMATS)
    if not formats:
        raise ValueError("formats must name at least one of 'png', 'svg', 'pdf', but got an empty sequence")
    figure_cls, canvas_cls = require_matplotlib()

    order = feature_order(h, sort)
    h = h[:, order]
    m, f = h.shape
    xs = list(range(f))
    fig = figure_cls(figsize=figsize, dpi=dpi)
    canvas_cls(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i in range(m):
        color = SUBNETWORK_COLORS[i % len(SUBNETWORK_COLORS)]
        ax.bar(xs, h[i].tolist(), width=1.0, color=color, alpha=0.55, linewidth=0, label=f"subnetwork {i}")
    overlap = h.min(dim=0).values
    ax.bar(xs, overlap.tolist(), width=1.0, color=OVERLAP_COLOR, linewidth=0, label="overlap (min over subnetworks)")
    ax.set_xlim(-0.5, f - 0.5)
    ax.set_ylim(0.0, 1.3 * max(float(h.max()), torch.finfo(torch.float32).tiny))  # room for the legend
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    rates = (
        f"sharing {float(sharing_rate(h, 'mean-ratio')):.1f}% (mean ratio), "
        f"{float(sharing_rate(h, 'sum-ratio')):.1f}% (sum ratio)"
    )
    ax.set_title(f"{title}\n{rates}" if title else rates, fontsize=9)
    ax.legend(fontsize=7, loc="upper right", ncol=min(m + 1, 3), frameon=False)
    ax.tick_params(labelsize=7)
    fig.tight_layout()

    return save_figure(fig, path, list(formats))
