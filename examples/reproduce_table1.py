#!/usr/bin/env python
"""Reproduce Table 1 of the MixShare paper: five methods x N seeds, one command, resumable.

Rows (the library's presets):

    MixMo                               --method mixmo
    MixMo + Unmix                       --method unmix
    MixMo + Unmix + kernel init.        --method unmix-aligned
    MixShare (partial on 25% features)  --method mixshare-partial
    MixShare (fadeout to 1/3 of training, epoch 100 of 300)   --method mixshare

Every run is ``python examples/cifar100_wrn.py`` (the training script beside this file), started as a child process
of the same Python with ``--method``, ``--seed``, ``--out-dir <out>/runs`` and ``--run-name <method>-s<seed>``; its
results are read from the ``summary.json`` it writes in ``<out>/runs/<method>-s<seed>/``. By default that script's
defaults are the paper's schedule (CIFAR-100, WRN-28-2, 300 epochs, batch 64 with repetition 2); ``--quick`` uses a
small schedule on the built-in synthetic data sized for a 2-core CPU (see ``QUICK``). Arguments after ``--`` go to
every run unchanged (``-- --data-dir ~/data --download --amp bf16``). The WRN starts from the library's default
initialisation (PyTorch's defaults with He-normal linear layers, chosen by measurement: docs/reproducing.md,
"Initialisation"); ``-- --init mixmo`` trains every row from the truncated He-normal initialisation of MixMo's
code, as the paper did.

Resuming: a run whose ``summary.json`` exists is not trained again; a run with a ``checkpoint.pt`` but no summary
is continued with ``--resume``. Re-running the same command after an interruption finishes the table.

Errors: this script's own options are checked before any run starts; the arguments after ``--`` are checked by the
training script when the first run starts, which then stops before it writes anything (every run gets the same
ones, and every Table 1 preset accepts the same overrides, so no run trains with a bad one). A bad option, or a run
that cannot go on (e.g. a damaged checkpoint), ends the script with one line on stderr (the run's name, then the
training script's own error line) and exit code 2.

Output (written atomically) under ``--out-dir``:

    table1.md    the table in the paper's format (ensemble acc., mean individual acc., classifier share rate,
                 mean ± std over seeds) next to the paper's numbers, with the data / schedule / seeds it used
    table1.csv   the same numbers, one row per method
    runs.csv     one row per run

Usage:
    python examples/reproduce_table1.py -- --data-dir ~/data --download      # the paper's setting (GPU: days)
    python examples/reproduce_table1.py --width 5 -- --data-dir ~/data       # the WRN-28-5 columns
    python examples/reproduce_table1.py --quick --seeds 0 1                  # CPU, synthetic data
    python examples/reproduce_table1.py --quick -- --init mixmo              # the paper code's initialisation
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import subprocess
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
TRAIN_SCRIPT = HERE / "cifar100_wrn.py"

# (preset, the paper's row label)
ROWS = (
    ("mixmo", "MixMo"),
    ("unmix", "MixMo + Unmix"),
    ("unmix-aligned", "MixMo + Unmix + kernel init."),
    ("mixshare-partial", "MixShare (partial on 25% features)"),
    ("mixshare", "MixShare (fadeout, first 1/3 of training)"),
)
# Table 1 of the paper (CIFAR-100, 300 epochs, mean ± std of 3 runs): (ens. acc, ind. acc, classifier share rate)
PAPER = {
    2: {
        "mixmo": ((74.8, 0.2), (71.6, 0.2), (4.9, 0.4)),
        "unmix": ((69.7, 15.4), (69.7, 15.4), (99.1, 0.4)),
        "unmix-aligned": ((79.0, 0.1), (79.0, 0.1), (99.4, 0.1)),
        "mixshare-partial": ((73.3, 0.5), (71.5, 1.0), (60.6, 6.5)),
        "mixshare": ((79.0, 0.1), (76.7, 1.3), (64.4, 6.0)),
    },
    5: {
        "mixmo": ((81.9, 0.1), (79.4, 0.2), (8.2, 0.1)),
        "unmix": ((79.4, 2.7), (79.4, 2.7), (98.8, 0.7)),
        "unmix-aligned": ((82.1, 0.2), (82.1, 0.2), (99.3, 0.1)),
        "mixshare-partial": ((79.9, 0.3), (78.8, 0.4), (60.0, 2.3)),
        "mixshare": ((82.4, 0.3), (81.6, 0.5), (62.7, 8.3)),
    },
}
# --quick: WRN-10-1 on the synthetic data (20 classes, 16x16 images, 6000 training / 2000 test), 20 epochs (3740
# steps), sized so that 5 methods x 3 seeds take about 20-25 minutes on a 2-core CPU (a WRN-10-1 step at 16x16 costs
# about a quarter of one at 32x32, so small images buy 4x more steps). The recipe is the paper's (batch 64 with batch
# repetition 2, SGD Nesterov, warmup over the first epoch, weight decay 6e-4, fadeout over the first third of
# training) except for the learning rate: the paper's 0.025 with x0.1 at 25 % of such a short run learns next to
# nothing, so the quick schedule uses a peak lr of 0.1 and decays at 50 % and 75 %.
QUICK = [
    "--dataset", "synthetic", "--synthetic-train", "6000", "--synthetic-test", "2000", "--synthetic-classes", "20",
    "--synthetic-size", "16", "--depth", "10", "--width", "1", "--epochs", "20", "--lr", "0.1",
    "--milestones", "0.5,0.75", "--eval-every", "0", "--eval-batch-size", "1000", "--progress", "false",
    "--tensorboard", "false",
]  # fmt: skip
METRICS = (
    ("ensemble_acc_pct", "ens. acc. (%)"),
    ("mean_individual_acc_pct", "ind. acc. (%)"),
    ("classifier_sharing_pct", "classifier share rate (%)"),
)


SEED_LIMIT = 2**32


class TableError(Exception):
    """A problem the user can fix (printed as one line by the script)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) with exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


# ----------------------------------------------------------------------------------------------------------------
ERROR_PREFIX = b"error: "


def relay_stderr(stream: IO[bytes], sink: IO[bytes]) -> str:
    """Copy a child's stderr to ``sink`` as it comes, except a last line starting with ``error: ``, returned instead.

    The training script's one-line error is its last output; holding back whatever may still become that line (a
    line that starts with ``error: ``, or a start of one) lets this script print it once, with the run's name.
    Progress bars (lines rewritten after ``\\r``) pass through as they are drawn. Returns ``""`` when the child's
    output did not end with such a line.
    """
    held = b""
    while chunk := os.read(stream.fileno(), 1 << 16):
        text = held + chunk
        last = max(text.rfind(b"\n", 0, len(text) - 1), text.rfind(b"\r", 0, len(text) - 1)) + 1
        tail = text[last:]
        held = tail if tail.startswith(ERROR_PREFIX) or ERROR_PREFIX.startswith(tail) else b""
        sink.write(text[: len(text) - len(held)])
        sink.flush()
    if not held.startswith(ERROR_PREFIX):
        sink.write(held)
        sink.flush()
        return ""
    return held[len(ERROR_PREFIX) :].decode("utf-8", errors="replace").strip()


def train(run_argv: Sequence[str], name: str, script: Path = TRAIN_SCRIPT) -> None:
    """Run the training script with ``run_argv`` in a child process of this Python (``TableError`` if it fails)."""
    if not script.is_file():
        raise TableError(f"the training script {script} is missing")
    sys.stdout.flush()
    sys.stderr.flush()
    with subprocess.Popen([sys.executable, str(script), *run_argv], stderr=subprocess.PIPE) as child:
        assert child.stderr is not None
        error = relay_stderr(child.stderr, sys.stderr.buffer)
        code = child.wait()
    if code == 0:
        return
    if error:
        raise TableError(f"{name}: {error}")
    raise TableError(f"{name}: the training script stopped with exit code {code} (its output is above)")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for a single value) of the finite values (NaN if none)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def fmt(mean: float, std: float, digits: int = 1) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def sum_ratio_sharing(run_dir: Path) -> float | None:
    """Classifier sharing with the sum-of-min / sum-of-max reduction, from the run's checkpoint (None if unreadable).

    The checkpoint is loaded safely (``mixshare_layers.checkpoint.load_checkpoint``: ``weights_only=True`` only,
    digest checked); one that cannot be used leaves the column empty, with a note saying why.
    """
    from mixshare_layers.analysis import classifier_influence, load_wrn_checkpoint, sharing_rate
    from mixshare_layers.checkpoint import CheckpointError

    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.is_file():
        return None
    try:
        model, _ = load_wrn_checkpoint(ckpt)
    except CheckpointError as err:
        print(f"[table1] note: sum-ratio column left empty: {err}", flush=True)
        return None
    return float(sharing_rate(classifier_influence(model), "sum-ratio"))


def collapsed_in(summary: dict[str, Any]) -> list[int] | None:
    """The run's collapsed members (``mixshare_layers.evaluation.collapsed_members``; None if it cannot be told).

    Read from the summary, or computed from its member accuracies and the number of classes in the run's
    ``config.json`` (summaries written before the check existed).
    """
    if summary.get("collapsed_members") is not None:
        return [int(i) for i in summary["collapsed_members"]]
    accs = summary.get("individual_acc_pct")
    cfg_path = Path(summary.get("run_dir", "")) / "config.json"
    if not accs or not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    num_classes = cfg.get("synthetic_classes") if cfg.get("dataset") == "synthetic" else 100
    if not isinstance(num_classes, int) or num_classes < 2:
        return None
    from mixshare_layers.evaluation.metrics import collapsed_members

    return collapsed_members([a / 100 for a in accs], num_classes)


def collapse_note(runs: list[dict[str, Any]]) -> str:
    """One sentence naming the runs that had a collapsed member (and their member accuracies)."""
    bad = [r for r in runs if r.get("collapsed_members")]
    if not bad:
        return "No run had a collapsed member (accuracy near chance while another member learned)."
    items = []
    for r in bad:
        accs = " / ".join(f"{a:.1f}" for a in r.get("individual_acc_pct") or [])
        members = ", ".join(str(i) for i in r["collapsed_members"])
        items.append(f"`{r['method']}` seed {r['seed']} (member {members}; member accuracies {accs} %)")
    return "Runs with a collapsed member (accuracy near chance while another member learned): " + "; ".join(items) + "."


# ----------------------------------------------------------------------------------------------------------------
def aggregate(runs: list[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method: mean and std of every metric over its runs."""
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        row: dict[str, Any] = {"method": method, "runs": len(mine), "seeds": " ".join(str(r["seed"]) for r in mine)}
        row["collapsed_seeds"] = " ".join(str(r["seed"]) for r in mine if r.get("collapsed_members"))
        for key, _ in (*METRICS, ("classifier_sharing_sum_ratio_pct", ""), ("encoder_sharing_pct", "")):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r.get(key) for r in mine])
        rows.append(row)
    return rows


def render_markdown(rows: list[dict[str, Any]], width: int, description: str) -> str:
    labels = dict(ROWS)
    paper = PAPER.get(width, PAPER[2])
    paper_name = f"WRN-28-{width if width in PAPER else 2}"
    head = (
        "| method | ens. acc. (%) | ind. acc. (%) | classifier share rate (%) | share, sum ratio (%) | runs "
        f"| collapsed member (seeds) | paper {paper_name}: ens. / ind. / share |"
    )
    lines = [description, "", head, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m = row["method"]
        cells = [fmt(row[f"{k}_mean"], row[f"{k}_std"]) for k, _ in METRICS]
        cells.append(fmt(row["classifier_sharing_sum_ratio_pct_mean"], row["classifier_sharing_sum_ratio_pct_std"]))
        ref = paper.get(m)
        ref_text = " / ".join(fmt(*v) for v in ref) if ref else "–"
        collapsed = row.get("collapsed_seeds") or "none"
        lines.append(
            f"| {labels.get(m, m)} (`{m}`) | " + " | ".join(cells) + f" | {row['runs']} | {collapsed} | {ref_text} |"
        )
    lines += [
        "",
        "mean ± sample standard deviation (n - 1) over the runs; classifier share rate = mean over features of "
        "min_i h_i / max_i h_i of the heads' column L1 norms (paper Sec. 2); 'sum ratio' = sum_f min / sum_f max.",
    ]
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict[str, Any]], width: int) -> str:
    paper = PAPER.get(width, PAPER[2])
    cols = ["method", "runs", "seeds", "collapsed_seeds"]
    for key, _ in (*METRICS, ("classifier_sharing_sum_ratio_pct", ""), ("encoder_sharing_pct", "")):
        cols += [f"{key}_mean", f"{key}_std"]
    cols += ["paper_ensemble_acc_pct", "paper_ensemble_acc_pct_std", "paper_mean_individual_acc_pct"]
    cols += ["paper_mean_individual_acc_pct_std", "paper_classifier_sharing_pct", "paper_classifier_sharing_pct_std"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = {k: row[k] for k in cols if k in row}
        ref = paper.get(row["method"])
        if ref:
            (e, es), (i, is_), (s, ss) = ref
            out.update(
                paper_ensemble_acc_pct=e,
                paper_ensemble_acc_pct_std=es,
                paper_mean_individual_acc_pct=i,
                paper_mean_individual_acc_pct_std=is_,
                paper_classifier_sharing_pct=s,
                paper_classifier_sharing_pct_std=ss,
            )
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()})
    return buf.getvalue()


def render_runs_csv(runs: list[dict[str, Any]]) -> str:
    cols = ["method", "seed", "ensemble_acc_pct", "mean_individual_acc_pct", "classifier_sharing_pct"]
    cols += ["classifier_sharing_sum_ratio_pct", "encoder_sharing_pct", "individual_acc_pct", "collapsed_members"]
    cols += ["epochs", "steps", "train_time_s", "run_dir"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for run in runs:
        cells = {k: ("" if run.get(k) is None else run.get(k)) for k in cols}
        for k in ("individual_acc_pct", "collapsed_members"):  # lists as space-separated values
            if isinstance(cells[k], list):
                cells[k] = " ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in cells[k])
        writer.writerow(cells)
    return buf.getvalue()


def write_table(
    runs: list[dict[str, Any]], out_dir: Path, *, methods: Sequence[str], width: int, description: str
) -> dict[str, Path]:
    """Write table1.md, table1.csv and runs.csv under ``out_dir`` from the runs' summaries; returns the paths."""
    from mixshare_layers.files import write_text

    rows = aggregate(runs, methods)
    paths = {"markdown": out_dir / "table1.md", "csv": out_dir / "table1.csv", "runs": out_dir / "runs.csv"}
    write_text(paths["markdown"], render_markdown(rows, width, description) + "\n" + collapse_note(runs) + "\n")
    write_text(paths["csv"], render_csv(rows, width))
    write_text(paths["runs"], render_runs_csv(runs))
    return paths


def describe(runs: list[dict[str, Any]], quick: bool, seeds: Sequence[int]) -> str:
    """One paragraph saying what was measured (read from the first run's config.json)."""
    cfg: dict[str, Any] = {}
    for run in runs:
        path = Path(run.get("run_dir", "")) / "config.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            break
    if not cfg:
        return f"Runs: seeds {list(seeds)}."
    if cfg.get("dataset") == "synthetic":
        data = (
            f"built-in synthetic data ({cfg.get('synthetic_classes')} classes, {cfg.get('synthetic_size')}x"
            f"{cfg.get('synthetic_size')} images, {cfg.get('synthetic_train')} train / {cfg.get('synthetic_test')} "
            f"test, data seed {cfg.get('data_seed')})"
        )
    else:
        data = "CIFAR-100 (50k train / 10k test)"
    return (
        f"{'Quick CPU schedule' if quick else 'Schedule'}: {data}; WRN-{cfg.get('depth')}-{cfg.get('width')}, "
        f"M = {cfg.get('num_subnetworks')}, {cfg.get('epochs')} epochs, batch {cfg.get('batch_size')} with batch "
        f"repetition {cfg.get('batch_repetition')}, peak lr {cfg.get('lr_resolved', cfg.get('lr'))}, weight decay "
        f"{cfg.get('weight_decay')}; ensemble rule {cfg.get('ensemble_rule')}; last epoch reported; seeds "
        f"{', '.join(str(s) for s in seeds)}."
    )


# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small CPU schedule on the synthetic data (QUICK)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed and method")
    p.add_argument("--methods", nargs="+", default=[m for m, _ in ROWS], choices=[m for m, _ in ROWS])
    p.add_argument("--width", type=int, default=None, help="WRN width (default: 2, the paper's focus; 1 in --quick)")
    p.add_argument("--out-dir", default="runs/table1", help="where runs/, table1.md, table1.csv go")
    p.add_argument("--table-only", action="store_true", help="train nothing: tabulate the finished runs")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train (or resume) every missing run, each in a child process, then write the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"argument --seeds: must not repeat a seed, got {args.seeds}")
    bad = [s for s in args.seeds if not 0 <= s < SEED_LIMIT]
    if bad:
        parser.error(f"argument --seeds: seeds must be in [0, 2**32), got {bad}")
    if args.width is not None and args.width < 1:
        parser.error(f"argument --width: must be >= 1, got {args.width}")
    from mixshare_layers.files import folder_problem

    out_dir = Path(args.out_dir)
    problem = folder_problem(out_dir)
    if problem is not None:
        parser.error(f"argument --out-dir: cannot write to {out_dir}: {problem}")
    runs_dir = out_dir / "runs"
    schedule = list(QUICK) if args.quick else []
    width = args.width if args.width is not None else (1 if args.quick else 2)
    if args.width is not None:
        schedule += ["--width", str(args.width)]

    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}-s{seed}"
            run_dir = runs_dir / name
            summary_path = run_dir / "summary.json"
            summary = read_summary(summary_path) if summary_path.is_file() else None
            if summary is not None and not summary.get("stopped_early", False):
                print(f"[table1] {name}: done before, skipped ({summary_path})", flush=True)
            elif args.table_only:
                print(f"[table1] {name}: not finished, left out (--table-only)", flush=True)
                continue
            else:
                if (run_dir / "checkpoint.pt").is_file():
                    run_argv = ["--resume", str(run_dir), *passthrough]
                    print(f"[table1] {name}: resuming", flush=True)
                else:
                    run_argv = [
                        *schedule, "--method", method, "--seed", str(seed), "--out-dir", str(runs_dir),
                        "--run-name", name, *passthrough,
                    ]  # fmt: skip
                    print(f"[table1] {name}: training ({' '.join(run_argv)})", flush=True)
                t0 = time.perf_counter()
                train(run_argv, name)
                if not summary_path.is_file():
                    raise TableError(f"{name}: the training script ended without writing {summary_path}")
                summary = read_summary(summary_path)
                print(f"[table1] {name}: finished in {time.perf_counter() - t0:.0f} s", flush=True)
            summary["method"], summary["seed"] = method, seed
            summary.setdefault("run_dir", str(run_dir))
            summary["classifier_sharing_sum_ratio_pct"] = sum_ratio_sharing(Path(summary["run_dir"]))
            summary["collapsed_members"] = collapsed_in(summary)
            if summary["collapsed_members"]:
                bad = ", ".join(map(str, summary["collapsed_members"]))
                accs = " / ".join(f"{a:.2f}" for a in summary.get("individual_acc_pct") or [])
                print(f"[table1] {name}: WARNING: member(s) {bad} collapsed (member accuracies {accs} %)", flush=True)
            runs.append(summary)

    description = describe(runs, args.quick, args.seeds)
    paths = write_table(runs, out_dir, methods=args.methods, width=width, description=description)
    text = paths["markdown"].read_text()
    print(text, flush=True)
    print(f"[table1] wrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - started:.0f} s)")
    return {"runs": runs, "paths": paths, "markdown": text}


def read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        text = " ".join(str(err).split())
        raise TableError(f"{path} cannot be read ({text}): delete it to run that cell again") from None
    if not isinstance(summary, dict):
        raise TableError(f"{path} does not hold a run summary (a JSON object): delete it to run that cell again")
    from mixshare_layers.evaluation.report import renamed_summary

    return renamed_summary(summary)  # (a summary written before its keys named their units: renamed)


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: :func:`main`, with a ``TableError`` printed as one line; returns the exit code."""
    try:
        main(argv)
    except TableError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
