"""What a training run shows as it trains: the printed line of each epoch, one progress bar (:class:`Progress`, also
across several trainings), ``metrics.csv`` (:class:`RunLog`, every cell in the unit its column names) and
TensorBoard scalars.

Example:
    >>> import tempfile
    >>> metrics = {"ensemble_acc": 0.5, "mean_individual_acc": 0.45, "individual_acc": [0.5, 0.4], "nll": 1.2,
    ...            "ece": 0.031, "brier": 0.6, "disagreement": 0.25, "mean_confidence": 0.52}
    >>> row = {"epoch": 1, **epoch_columns("test", metrics, {"classifier_sharing": 40.0})}
    >>> row["test_ece_pct"], row["test_acc_1_pct"], row["classifier_sharing_pct"]
    (3.1, 40.0, 40.0)
    >>> tensorboard_scalars(row, ["test"])["test/acc_member_1_pct"]
    40.0
    >>> path = write_csv(f"{tempfile.mkdtemp()}/metrics.csv", metrics_columns(2, ["test"]), [row])
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from ..files import write_text

__all__ = [
    "EVAL_COLUMNS",
    "SHARING_KEYS",
    "Progress",
    "RunLog",
    "csv_cell",
    "epoch_columns",
    "epoch_line",
    "metrics_columns",
    "tensorboard_scalars",
    "write_csv",
]

# (metric of mixshare_layers.evaluation, column, factor to the column's unit)
EVAL_COLUMNS = (
    ("ensemble_acc", "ensemble_acc_pct", 100.0),
    ("mean_individual_acc", "mean_individual_acc_pct", 100.0),
    ("nll", "nll_nats", 1.0),
    ("ece", "ece_pct", 100.0),
    ("brier", "brier", 1.0),
    ("disagreement", "disagreement_pct", 100.0),
    ("mean_confidence", "mean_confidence_pct", 100.0),
)
#: the sharing rates of :func:`mixshare_layers.analysis.sharing_rates`, as a run's summary names them (percent)
SHARING_KEYS = ("classifier_sharing", "encoder_sharing", "classifier_sharing_sum_ratio", "encoder_sharing_sum_ratio")
_MEMBER, _MEMBER_TAG = re.compile(r"^acc_(\d+)_"), r"acc_member_\1_"  # a member's column; its TensorBoard tag


def metrics_columns(num_subnetworks: int, splits: Sequence[str]) -> list[str]:
    """The columns of metrics.csv: the epoch, then per evaluated split its metrics and members, then sharing."""
    columns = ["epoch", "step", "lr", "train_loss_nats", "images_per_s", "time_s"]
    for split in splits:
        columns += [f"{split}_{column}" for _, column, _ in EVAL_COLUMNS]
        columns += [f"{split}_acc_{i}_pct" for i in range(num_subnetworks)]
    return columns + [f"{key}_pct" for key in SHARING_KEYS]


def epoch_columns(split: str, metrics: Mapping[str, Any], sharing: Mapping[str, float | None]) -> dict[str, Any]:
    """One evaluation as metrics.csv cells: ``{split}_<metric>`` in the column's unit, ``{split}_acc_<i>_pct`` per
    member, and the sharing rates (:func:`~mixshare_layers.evaluation.report.sharing_entries`)."""
    out = {f"{split}_{column}": factor * metrics[key] for key, column, factor in EVAL_COLUMNS}
    out.update({f"{split}_acc_{i}_pct": 100.0 * a for i, a in enumerate(metrics["individual_acc"])})
    out.update({f"{key}_pct": value for key, value in sharing.items()})
    return out


def tensorboard_scalars(row: Mapping[str, Any], splits: Sequence[str]) -> dict[str, float]:
    """The evaluation cells of a metrics.csv row as TensorBoard tags: ``test_nll_nats`` -> ``test/nll_nats``,
    ``test_acc_0_pct`` -> ``test/acc_member_0_pct``, ``encoder_sharing_pct`` -> ``sharing/encoder_sharing_pct``."""
    out = {}
    for column, value in row.items():
        split, _, name = column.partition("_")
        if split in splits:
            out[f"{split}/{_MEMBER.sub(_MEMBER_TAG, name)}"] = value
        elif column.startswith(SHARING_KEYS[:2]):
            out[f"sharing/{column}"] = value
    return {tag: float(v) for tag, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def epoch_line(row: Mapping[str, Any], split: str | None = None, metrics: Mapping[str, Any] | None = None) -> str:
    """The printed line of an epoch (a metrics.csv row with its ``epoch_time_s``) and of its evaluation, if any."""
    head = f"epoch {row['epoch']}: loss {row['train_loss_nats']:.4f}"
    if metrics is None:
        return f"{head}, {row['images_per_s']:.0f} img/s, {row['epoch_time_s']:.1f} s"
    members = " / ".join(f"{100 * a:.2f}" for a in metrics["individual_acc"])
    return (
        f"{head}, {split} ensemble acc {100 * metrics['ensemble_acc']:.2f} % (members {members} %), NLL "
        f"{metrics['nll']:.3f}, ECE {100 * metrics['ece']:.2f} %, confidence {100 * metrics['mean_confidence']:.2f} %, "
        f"lr {row['lr']:.3g}, {row['images_per_s']:.0f} img/s"
    )


def csv_cell(value: Any) -> Any:
    """A CSV cell: floats to 4 significant digits (``64.63``, ``0.0125``, ``12350.0``), None empty, else as is."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.4g}")
    return value


def write_csv(path: str | os.PathLike[str], columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` under the header ``columns`` (other keys ignored, missing ones empty), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: csv_cell(row.get(column)) for column in columns})
    return write_text(path, buf.getvalue())


class Progress:
    """One progress bar over the steps of one or more trainings run one after the other (``--quick`` trains the plain
    backbone, then the MixShare network): shown when ``enabled``, tqdm is installed and stdout is a terminal.

    Args:
        runs: the trainings the bar spans (each as long as the first: same epochs and steps per epoch).
        enabled: False for a process that shows nothing (or ``--progress false``).
    """

    def __init__(self, runs: int = 1, *, enabled: bool = True) -> None:
        self.runs, self.run, self.label, self.base = runs, 0, "", 0
        self.enabled = enabled and sys.stdout.isatty() and importlib.util.find_spec("tqdm") is not None
        self.bar = cast(Any, None)

    def start_run(self, label: str) -> None:
        """The next training, named ``label`` in the bar."""
        self.run, self.label = self.run + 1, label

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        """Epoch ``epoch`` (of ``epochs``, ``steps`` steps long) of the current training begins."""
        if not self.enabled:
            return
        if self.bar is None:
            tqdm = importlib.import_module("tqdm.auto").tqdm
            self.bar = tqdm(total=self.runs * epochs * steps, dynamic_ncols=True)
        self.base = (max(self.run, 1) - 1) * epochs * steps + (epoch - 1) * steps
        run = f" ({self.run}/{self.runs})" if self.runs > 1 else ""
        self.bar.set_description(f"{self.label}{run} epoch {epoch}/{epochs}")

    def step(self, done: int, **postfix: str) -> None:
        """``done`` steps into the epoch."""
        if self.bar is not None:
            self.bar.update(self.base + done - self.bar.n)
            self.bar.set_postfix(postfix)

    def write(self, *lines: str) -> None:
        """Print ``lines`` above the bar (or plainly, without one)."""
        if self.bar is not None:
            for line in lines:
                self.bar.write(line)
        else:
            print(*lines, sep="\n", flush=True)

    def close(self) -> None:
        """Close the bar (a new one opens at the next epoch)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunLog:
    """What a training run shows as it trains: printed lines, a progress bar, ``metrics.csv`` and TensorBoard.

    Only an ``enabled`` log (process 0 of a distributed run) prints or writes, and nothing is written before the first
    epoch's row or scalar (a run that stops before leaves no trace); metrics.csv is rewritten atomically every epoch.

    Args:
        folder: the run folder (``metrics.csv``, ``tensorboard/``).
        splits: the evaluated splits, in the columns' order (:func:`metrics_columns`, :func:`tensorboard_scalars`).
        num_subnetworks: M (a column per member).
        rows: the rows so far (a resumed run's history); ``self.rows`` holds them all.
        tensorboard: log scalars to TensorBoard, when ``torch.utils.tensorboard`` imports (else a note says so).
        purge_step: the step a resumed run continues from (TensorBoard hides the events the stopped run logged after).
        progress: a :class:`Progress` bar shared with other runs, or True for one of this run's own (shown when tqdm
            is installed and stdout is a terminal), or False.
        enabled: False for a process that shows and writes nothing.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        splits: Sequence[str],
        num_subnetworks: int,
        *,
        rows: Sequence[Mapping[str, Any]] = (),
        tensorboard: bool = True,
        purge_step: int = 0,
        progress: bool | Progress = True,
        enabled: bool = True,
    ) -> None:
        self.folder, self.splits, self.enabled, self.purge_step = Path(folder), list(splits), enabled, purge_step
        self.columns, self.rows = metrics_columns(num_subnetworks, splits), [dict(r) for r in rows]
        self.tensorboard, self.writer = tensorboard and enabled, cast(Any, None)
        self.own_bar = not isinstance(progress, Progress)
        self.bar = Progress(enabled=bool(progress) and enabled) if self.own_bar else cast(Progress, progress)
        if self.own_bar:
            self.bar.start_run("")

    def print(self, *lines: str) -> None:
        """Print ``lines`` (one per line, above the progress bar) when enabled (nothing for none)."""
        if self.enabled and lines:
            self.bar.write(*lines)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log ``{tag: value}`` at ``step`` to TensorBoard (opened on first use)."""
        if self.tensorboard and self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.print("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
                self.tensorboard = False
                return
            self.writer = SummaryWriter(str(self.folder / "tensorboard"), purge_step=self.purge_step or None)
        for tag, value in values.items() if self.tensorboard else ():
            self.writer.add_scalar(tag, value, step)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        """Open epoch ``epoch`` (of ``epochs``, ``steps`` steps long) on the progress bar."""
        self.bar.start_epoch(epoch, epochs, steps)

    def step(self, done: int, step: int, loss: float, lr: float, rows_per_s: float) -> None:
        """``done`` steps into the epoch (global ``step``): the bar, and the ``train/`` scalars."""
        self.scalars({"train/loss_nats": loss, "train/lr": lr, "train/images_per_s": rows_per_s}, step)
        self.bar.step(done, loss=f"{loss:.3f}", lr=f"{lr:.4g}", img_s=f"{rows_per_s:.0f}")

    def epoch(self, row: Mapping[str, Any], split: str | None = None, metrics: Mapping[str, Any] | None = None) -> None:
        """Close an epoch: print its line (:func:`epoch_line`), add its metrics.csv ``row`` (with its ``step``, the
        TensorBoard step of its evaluation's cells) and rewrite the file."""
        self.rows.append(dict(row))
        if self.enabled:
            self.print(epoch_line(row, split, metrics))
            write_csv(self.folder / "metrics.csv", self.columns, self.rows)
            self.scalars(tensorboard_scalars(row, self.splits), row["step"])

    def close(self) -> None:
        """Flush and close the TensorBoard files (and the bar, when it is this run's own)."""
        if self.own_bar:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
