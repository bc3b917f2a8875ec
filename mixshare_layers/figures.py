"""What every figure of the package shares: matplotlib, loaded on first use, the colours and the file formats.

Figures are drawn with matplotlib's object API on the Agg canvas (nothing touches pyplot's global state or needs a
display) and saved with :func:`mixshare_layers.files.save_figure` (atomically).
"""

from __future__ import annotations

from typing import Any

__all__ = ["OVERLAP_COLOR", "PLOT_FORMATS", "SUBNETWORK_COLORS", "require_matplotlib"]

#: One colour per subnetwork (red and blue first, as in the paper), cycled for M > 9.
SUBNETWORK_COLORS = (
    "#d62728",
    "#1f77b4",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
#: The colour of the overlap ``min_i h_i`` (orange in the paper).
OVERLAP_COLOR = "#ff9f1a"
#: The file formats a figure can be saved in.
PLOT_FORMATS = ("png", "svg", "pdf")


def require_matplotlib() -> Any:
    """matplotlib's ``(Figure, FigureCanvasAgg)``, or an ``ImportError`` naming the extra that installs it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'plotting needs matplotlib, which is an optional extra: pip install "mixshare-layers[analysis]" '
            "(or pip install matplotlib)"
        ) from exc
    return Figure, FigureCanvasAgg
