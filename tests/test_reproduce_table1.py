"""examples/reproduce_table1.py, run as a user runs it: the table it writes from finished runs, skipping and resuming
runs, what a failing run shows, its one-line errors, and one real (tiny) run of the training script.

The module's fixture runs every command first (``script_runs``); the tests read what each left.
Fake runs are folders holding a ``summary.json`` and a ``config.json``, as the training script leaves them; the
resume test runs a copy of the script next to a stand-in training script that records its arguments.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import shutil
import statistics
from pathlib import Path

import pytest
from script_runs import ROOT, Result, run, run_all, run_commands

SCRIPT, MODULE = "examples/reproduce_table1.py", "examples.reproduce_table1"

VALUES = {
    "mixmo": [(70.0, 66.0, 10.0), (72.0, 67.0, 12.0), (71.0, 68.5, 11.0)],
    "unmix-aligned": [(75.0, 75.0, 99.0), (77.5, 77.0, 98.0), (76.0, 76.5, 98.5)],
}

STAND_IN_TRAINER = """
import json, sys
from pathlib import Path

argv = sys.argv[1:]
with open(Path(__file__).with_name("calls.jsonl"), "a") as log:
    log.write(json.dumps(argv) + "\\n")
if "--fail" in argv:  # a warning, a progress bar cleared, then the one-line error
    sys.stderr.write("a warning\\n\\rstep 1/2\\r        \\rerror: the loss is nan\\n")
    sys.exit(2)
if "--resume" in argv:
    run_dir = Path(argv[argv.index("--resume") + 1])
else:
    run_dir = Path(argv[argv.index("--out-dir") + 1]) / argv[argv.index("--run-name") + 1]
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "config.json").write_text(json.dumps({"dataset": "synthetic", "depth": 10, "width": 1}))
summary = {"ensemble_acc_pct": 50.0, "mean_individual_acc_pct": 40.0, "classifier_sharing_pct": 70.0}
summary.update(run_dir=str(run_dir), stopped_early=False)
(run_dir / "summary.json").write_text(json.dumps(summary))
"""

BAD_OPTIONS = [
    (["--seeds", "1", "1"], "--seeds"),
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "x"], "--seeds"),
    (["--width", "0"], "--width"),
    (["--methods", "bogus"], "--methods"),
    (["--out-dir", "{tmp}/a-file/table"], "--out-dir"),
    (["--", "--lr", "-1"], "--lr"),
    (["--", "--device", "bogus"], "--device"),
    (["--", "--bogus-option"], "--bogus-option"),
    (["--", "--synthetic-size", "0"], "--synthetic-size"),
]
BAD_IDS = [" ".join(a) for a, _ in BAD_OPTIONS]


def _fake_run(runs: Path, method: str, seed: int, summary: dict, config: dict | None = None) -> None:
    run_dir = runs / f"{method}-s{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({**summary, "run_dir": str(run_dir)}))
    if config is not None:
        (run_dir / "config.json").write_text(json.dumps(config))


def _table_of_fake_runs(tmp: Path) -> list[str]:
    """Six finished runs, two methods x three seeds; mixmo seed 2 with a collapsed member."""
    for method, rows in VALUES.items():
        for seed, (ens, ind, share) in enumerate(rows):
            collapsed = [1] if (method, seed) == ("mixmo", 2) else []
            accs = [98.8, 0.4] if collapsed else [70.0, 68.0]
            summary = {"ensemble_acc_pct": ens, "mean_individual_acc_pct": ind, "classifier_sharing_pct": share}
            summary.update(encoder_sharing_pct=50.0, individual_acc_pct=accs, collapsed_members=collapsed)
            _fake_run(tmp / "runs", method, seed, summary)
    return ["--table-only", "--methods", "mixmo", "unmix-aligned", "--out-dir", str(tmp)]


def _table_of_odd_runs(tmp: Path) -> list[str]:
    """WRN-28-5 columns; one mixmo run, no mixshare run, and unmix runs whose collapse must be read or recomputed."""
    runs = tmp / "runs"
    one = {"ensemble_acc_pct": 70.0, "mean_individual_acc_pct": 66.0, "classifier_sharing_pct": 10.0}
    _fake_run(runs, "mixmo", 0, {**one, "individual_acc_pct": [70.0, 68.0], "collapsed_members": [0]})  # read as given
    # summaries written before the check existed: recomputed from the member accuracies and config.json's classes
    synthetic = {"dataset": "synthetic", "synthetic_classes": 20}
    _fake_run(runs, "unmix", 0, {**one, "individual_acc_pct": [98.8, 0.4]}, synthetic)
    _fake_run(runs, "unmix", 1, {**one, "individual_acc_pct": [70.0, 0.9]}, {"dataset": "cifar100"})
    _fake_run(runs, "unmix", 2, {**one, "individual_acc_pct": [70.0, 60.0]}, {"dataset": "cifar100"})
    _fake_run(runs, "unmix", 3, {"ensemble_acc_pct": 50.0})  # nothing to judge from
    methods = ["--methods", "mixmo", "mixshare", "unmix"]
    return ["--table-only", "--width", "5", *methods, "--seeds", "0", "1", "2", "3", "--out-dir", str(tmp)]


def _skip_and_resume(tmp: Path) -> tuple[Result, Result, Path, Result]:
    """A copy of the script beside a stand-in training script; the same command twice, then a failing run."""
    folder = tmp / "examples"
    folder.mkdir()
    shutil.copy(ROOT / SCRIPT, folder / "reproduce_table1.py")
    (folder / "cifar100_wrn.py").write_text(STAND_IN_TRAINER)
    runs = tmp / "out" / "runs"
    (runs / "mixmo-s1").mkdir(parents=True)
    (runs / "mixmo-s1" / "checkpoint.pt").write_bytes(b"")  # interrupted: to be resumed
    argv = ["--quick", "--seeds", "0", "1", "--methods", "mixmo", "unmix", "--out-dir", str(tmp / "out")]
    argv += ["--", "--epochs", "1"]
    first = run(folder / "reproduce_table1.py", *argv)
    second = run(folder / "reproduce_table1.py", *argv)
    failing = ["--quick", "--seeds", "0", "--methods", "mixmo", "--out-dir", str(tmp / "failing"), "--", "--fail"]
    return first, second, folder / "calls.jsonl", run(folder / "reproduce_table1.py", *failing)


def _bad_option(tmp: Path, argv: list[str]) -> list[str]:
    (tmp / "a-file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    out = [] if "--out-dir" in argv else ["--out-dir", str(tmp / "table")]
    cut = argv.index("--") if "--" in argv else len(argv)
    return ["--quick", "--seeds", "0", *out, *argv[:cut], *argv[cut:]]


def _damaged_checkpoint(tmp: Path) -> list[str]:
    run_dir = tmp / "table" / "runs" / "mixmo-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a whole archive")
    return ["--quick", "--seeds", "0", "--methods", "mixmo", "--out-dir", str(tmp / "table")]


def _real_run(tmp: Path) -> list[str]:
    tiny = ["--epochs", "1", "--synthetic-train", "64", "--synthetic-test", "32", "--synthetic-classes", "4"]
    tiny += ["--eval-batch-size", "32", "--shift-eval", "false"]
    return ["--quick", "--seeds", "0", "--methods", "mixmo", "--out-dir", str(tmp), "--", *tiny]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    """``(results, table folders, bad-option folders)``: every command line as ``python -m
    examples.reproduce_table1`` in one process (the runs it starts are processes of their own), and at the same
    time the copy of the script beside a stand-in training script (``_skip_and_resume``)."""
    folder = tmp_path_factory.mktemp
    tables = {"fake": folder("fake"), "odd": folder("odd"), "real": folder("real")}
    commands = {
        "fake": _table_of_fake_runs(tables["fake"]),
        "odd": _table_of_odd_runs(tables["odd"]),
        "damaged": _damaged_checkpoint(folder("damaged")),
        "real": _real_run(tables["real"]),
    }
    bad_dirs = {}
    for argv, _ in BAD_OPTIONS:
        key = " ".join(argv)
        bad_dirs[key] = folder("bad")
        commands[key] = _bad_option(bad_dirs[key], argv)
    calls = {
        "batch": functools.partial(run_commands, [(MODULE, argv) for argv in commands.values()]),
        "resume": functools.partial(_skip_and_resume, folder("resume")),
    }
    done = run_all(calls)
    results = dict(zip(commands, done["batch"], strict=True))
    results["resume"] = done["resume"]
    return results, tables, bad_dirs


def _files(out: Path) -> dict[str, str]:
    return {name: (out / name).read_text() for name in ("table1.md", "table1.csv", "runs.csv")}


def test_table_writer_mean_std_and_paper_numbers(outcome):
    results, tables, _ = outcome
    assert results["fake"].code == 0, results["fake"].err
    files = _files(tables["fake"])
    md = files["table1.md"]
    assert md.startswith("Runs: seeds [0, 1, 2].\n")  # no config.json to describe the runs with
    for method, label in (("mixmo", "MixMo"), ("unmix-aligned", "MixMo + Unmix + kernel init.")):
        cols = list(zip(*VALUES[method], strict=True))
        cells = [f"{statistics.mean(c):.1f} ± {statistics.stdev(c):.1f}" for c in cols]
        line = next(line for line in md.splitlines() if line.startswith(f"| {label} (`{method}`)"))
        assert all(cell in line for cell in cells), line
    assert "74.8 ± 0.2 / 71.6 ± 0.2 / 4.9 ± 0.4" in md  # the paper's MixMo row, WRN-28-2
    assert "79.0 ± 0.1 / 79.0 ± 0.1 / 99.4 ± 0.1" in md

    rows = list(csv.DictReader(io.StringIO(files["table1.csv"])))
    assert [r["method"] for r in rows] == ["mixmo", "unmix-aligned"]
    ens = [v[0] for v in VALUES["mixmo"]]
    assert float(rows[0]["ensemble_acc_pct_mean"]) == pytest.approx(statistics.mean(ens))
    assert float(rows[0]["ensemble_acc_pct_std"]) == pytest.approx(statistics.stdev(ens))
    assert float(rows[0]["paper_classifier_sharing_pct"]) == 4.9 and rows[0]["runs"] == "3"
    assert len(list(csv.DictReader(io.StringIO(files["runs.csv"])))) == 6
    assert sorted(p.name for p in tables["fake"].iterdir()) == ["runs", "runs.csv", "table1.csv", "table1.md"]
    assert md in results["fake"].out  # the table is also printed


def test_collapsed_members_are_reported_per_run(outcome):
    """A run whose member stayed near chance is named in the table, its note, runs.csv, and on the console."""
    results, tables, _ = outcome
    files = _files(tables["fake"])
    md = files["table1.md"]
    mixmo = next(line for line in md.splitlines() if line.startswith("| MixMo (`mixmo`)"))
    aligned = next(line for line in md.splitlines() if line.startswith("| MixMo + Unmix + kernel init."))
    assert "| 3 | 2 |" in mixmo and "| 3 | none |" in aligned
    assert "`mixmo` seed 2 (member 1; member accuracies 98.8 / 0.4 %)" in md
    rows = list(csv.DictReader(io.StringIO(files["runs.csv"])))
    assert rows[2]["collapsed_members"] == "1" and rows[2]["individual_acc_pct"] == "98.80 0.40"
    assert rows[0]["collapsed_members"] == ""
    table_rows = list(csv.DictReader(io.StringIO(files["table1.csv"])))
    assert table_rows[0]["collapsed_seeds"] == "2"
    warnings = [line for line in results["fake"].out.splitlines() if "WARNING" in line]
    assert warnings == ["[table1] mixmo-s2: WARNING: member(s) 1 collapsed (member accuracies 98.80 / 0.40 %)"]
    resumed = results["resume"][2].parent.parent / "out" / "table1.md"  # no run there has a collapsed member
    assert "No run had a collapsed member" in resumed.read_text()


def test_collapsed_in_reads_the_summary_or_recomputes_it(outcome):
    results, tables, _ = outcome
    assert results["odd"].code == 0, results["odd"].err
    rows = {(r["method"], r["seed"]): r for r in csv.DictReader(io.StringIO(_files(tables["odd"])["runs.csv"]))}
    assert rows["mixmo", "0"]["collapsed_members"] == "0"  # as the summary says
    assert rows["unmix", "0"]["collapsed_members"] == "1"  # synthetic data, 20 classes: 0.4 % is chance
    assert rows["unmix", "1"]["collapsed_members"] == "1"  # CIFAR-100: 0.9 % is chance
    assert rows["unmix", "2"]["collapsed_members"] == ""  # 60 % learned
    assert rows["unmix", "3"]["collapsed_members"] == "" and rows["unmix", "3"]["individual_acc_pct"] == ""  # unknown
    warned = [line.split(":")[0] for line in results["odd"].out.splitlines() if "WARNING" in line]
    assert warned == ["[table1] mixmo-s0", "[table1] unmix-s0", "[table1] unmix-s1"]


def test_table_writer_single_run_and_missing_method(outcome):
    results, tables, _ = outcome
    files = _files(tables["odd"])
    md = files["table1.md"]
    assert "| 70.0 | 66.0 | 10.0 |" in md  # one run: no std
    assert "81.9 ± 0.1 / 79.4 ± 0.2 / 8.2 ± 0.1" in md  # WRN-28-5 columns
    row = list(csv.DictReader(io.StringIO(files["table1.csv"])))[1]
    assert row["method"] == "mixshare" and row["runs"] == "0" and row["ensemble_acc_pct_mean"] == ""
    assert "[table1] mixshare-s0: not finished, left out (--table-only)" in results["odd"].out


def test_mean_std(outcome):
    """Sample standard deviation (n - 1); a single run has none; a run without a value is left out of the mean."""
    _, tables, _ = outcome
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(_files(tables["odd"])["table1.csv"]))}
    unmix = rows["unmix"]  # four runs, three with an ensemble accuracy of 70.0 and one of 50.0
    mean, std = statistics.mean([70.0, 70.0, 70.0, 50.0]), statistics.stdev([70.0, 70.0, 70.0, 50.0])
    assert float(unmix["ensemble_acc_pct_mean"]) == pytest.approx(mean)
    assert float(unmix["ensemble_acc_pct_std"]) == pytest.approx(std)
    assert float(unmix["mean_individual_acc_pct_mean"]) == 66.0 and float(unmix["mean_individual_acc_pct_std"]) == 0.0
    assert unmix["encoder_sharing_pct_mean"] == unmix["encoder_sharing_pct_std"] == ""  # no run has a value
    assert float(rows["mixmo"]["ensemble_acc_pct_mean"]) == 70.0 and rows["mixmo"]["ensemble_acc_pct_std"] == ""


def test_runs_are_skipped_or_resumed(outcome):
    results, _, _ = outcome
    first, second, log, _ = results["resume"]
    assert first.code == 0, first.err
    calls = [json.loads(line) for line in log.read_text().splitlines()][:4]  # the 5th: the failing test's run
    runs = log.parent.parent / "out" / "runs"
    assert len(calls) == 4 and calls[1] == ["--resume", str(runs / "mixmo-s1"), "--epochs", "1"]
    fresh = [calls[0], calls[2], calls[3]]
    schedule = fresh[0][: fresh[0].index("--method")]
    assert schedule[:2] == ["--dataset", "synthetic"] and "--depth" in schedule  # the --quick schedule first
    for argv, (method, seed) in zip(fresh, [("mixmo", 0), ("unmix", 0), ("unmix", 1)], strict=True):
        assert argv[: len(schedule)] == schedule and argv[-2:] == ["--epochs", "1"]
        tail = ["--method", method, "--seed", str(seed), "--out-dir", str(runs), "--run-name", f"{method}-s{seed}"]
        assert argv[len(schedule) : -2] == tail
    table = list(csv.DictReader(io.StringIO((runs.parent / "runs.csv").read_text())))
    assert [(r["method"], r["seed"]) for r in table] == [("mixmo", "0"), ("mixmo", "1"), ("unmix", "0"), ("unmix", "1")]
    markdown = (runs.parent / "table1.md").read_text()
    assert "Quick CPU schedule: built-in synthetic data" in markdown

    assert second.code == 0, second.err  # everything done: nothing trained
    assert len(log.read_text().splitlines()) == 5 and markdown in second.out  # no new call but the failing run's
    assert second.out.count("done before, skipped") == 4


def test_a_failing_run_passes_its_output_through_and_ends_the_table_in_one_line(outcome):
    """The training script's stderr reaches the user as it comes (a progress bar included); its last line, the
    one-line error, is printed once, with the run's name."""
    failing = outcome[0]["resume"][3]
    assert failing.code == 2, failing.err
    assert failing.err == "a warning\n\rstep 1/2\r        \rerror: mixmo-s0: the loss is nan\n"


@pytest.mark.parametrize(("argv", "option"), BAD_OPTIONS, ids=BAD_IDS)
def test_bad_option_one_line_exit_2_nothing_written(outcome, argv, option):
    results, _, bad_dirs = outcome
    key = " ".join(argv)
    res = results[key]
    lines = res.err_lines()
    assert res.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], res.err
    assert sorted(p.name for p in bad_dirs[key].iterdir()) == ["a-file"]  # no run started, nothing written


def test_a_run_that_cannot_resume_stops_the_table_in_one_line(outcome):
    res = outcome[0]["damaged"]
    lines = res.err_lines()
    assert res.code == 2 and len(lines) == 1, res.err
    assert lines[0].startswith("error: mixmo-s0: --resume: checkpoint ") and "truncated or damaged" in lines[0]


def test_a_real_run_of_the_training_script_fills_its_cell(outcome):
    """The training script, started as a child process, writes the summary the table is made of."""
    results, tables, _ = outcome
    res, out = results["real"], tables["real"]
    assert res.code == 0, res.err[-3000:]
    run_dir = out / "runs" / "mixmo-s0"
    summary = json.loads((run_dir / "summary.json").read_text())
    (row,) = csv.DictReader(io.StringIO((out / "runs.csv").read_text()))
    assert row["method"] == "mixmo" and float(row["ensemble_acc_pct"]) == pytest.approx(summary["ensemble_acc_pct"])
    assert row["run_dir"] == str(run_dir) and summary["epochs"] == 1
    assert row["classifier_sharing_sum_ratio_pct"] != ""  # read from the run's checkpoint
