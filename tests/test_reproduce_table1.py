"""examples/reproduce_table1.py: the table writer and the resume logic, on fake runs."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce_table1.py"


@pytest.fixture(scope="module")
def table1():
    spec = importlib.util.spec_from_file_location("_reproduce_table1_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _fake_runs():
    values = {
        "mixmo": [(70.0, 66.0, 10.0), (72.0, 67.0, 12.0), (71.0, 68.5, 11.0)],
        "unmix-aligned": [(75.0, 75.0, 99.0), (77.5, 77.0, 98.0), (76.0, 76.5, 98.5)],
    }
    runs = []
    for method, rows in values.items():
        for seed, (ens, ind, share) in enumerate(rows):
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    "ensemble_acc": ens,
                    "mean_individual_acc": ind,
                    "classifier_sharing": share,
                    "classifier_sharing_sum_ratio": share - 1.0,
                    "encoder_sharing": 50.0,
                    "run_dir": f"/nowhere/{method}-s{seed}",
                }
            )
    return values, runs


def test_table_writer_mean_std_and_paper_numbers(table1, tmp_path):
    values, runs = _fake_runs()
    paths = table1.write_table(runs, tmp_path, methods=["mixmo", "unmix-aligned"], width=2, description="fake runs")
    md = paths["markdown"].read_text()
    assert md.startswith("fake runs\n")
    for method, label in (("mixmo", "MixMo"), ("unmix-aligned", "MixMo + Unmix + kernel init.")):
        cols = list(zip(*values[method], strict=True))
        cells = [f"{statistics.mean(c):.1f} ± {statistics.stdev(c):.1f}" for c in cols]
        line = next(line for line in md.splitlines() if line.startswith(f"| {label} (`{method}`)"))
        assert all(cell in line for cell in cells), line
    assert "74.8 ± 0.2 / 71.6 ± 0.2 / 4.9 ± 0.4" in md  # the paper's MixMo row, WRN-28-2
    assert "79.0 ± 0.1 / 79.0 ± 0.1 / 99.4 ± 0.1" in md

    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [r["method"] for r in rows] == ["mixmo", "unmix-aligned"]
    ens = [v[0] for v in values["mixmo"]]
    assert float(rows[0]["ensemble_acc_mean"]) == pytest.approx(statistics.mean(ens))
    assert float(rows[0]["ensemble_acc_std"]) == pytest.approx(statistics.stdev(ens))
    assert float(rows[0]["paper_classifier_sharing"]) == 4.9 and rows[0]["runs"] == "3"
    assert len(list(csv.DictReader(io.StringIO(paths["runs"].read_text())))) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv", "table1.csv", "table1.md"]


def test_collapsed_members_are_reported_per_run(table1, tmp_path):
    """A run whose member stayed near chance is named in the table, its note, runs.csv, and on the console."""
    _, runs = _fake_runs()
    runs[2].update(individual_acc=[98.8, 0.4], collapsed_members=[1])  # a pre-fix quick MixMo run (issue 12)
    for r in runs[:2] + runs[3:]:
        r.update(individual_acc=[70.0, 68.0], collapsed_members=[])
    paths = table1.write_table(runs, tmp_path, methods=["mixmo", "unmix-aligned"], width=2, description="fake")
    md = paths["markdown"].read_text()
    mixmo = next(line for line in md.splitlines() if line.startswith("| MixMo (`mixmo`)"))
    aligned = next(line for line in md.splitlines() if line.startswith("| MixMo + Unmix + kernel init."))
    assert "| 3 | 2 |" in mixmo and "| 3 | none |" in aligned
    assert "`mixmo` seed 2 (member 1; member accuracies 98.8 / 0.4 %)" in md
    rows = list(csv.DictReader(io.StringIO(paths["runs"].read_text())))
    assert rows[2]["collapsed_members"] == "1" and rows[2]["individual_acc"] == "98.80 0.40"
    assert rows[0]["collapsed_members"] == ""
    table_rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert table_rows[0]["collapsed_seeds"] == "2"
    runs[2]["collapsed_members"] = []
    assert "No run had a collapsed member" in table1.collapse_note(runs)


def test_collapsed_in_reads_the_summary_or_recomputes_it(table1, tmp_path):
    assert table1.collapsed_in({"collapsed_members": [0]}) == [0]
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "synthetic", "synthetic_classes": 20}))
    old = {"individual_acc": [98.8, 0.4], "run_dir": str(tmp_path)}  # a summary written before the check
    assert table1.collapsed_in(old) == [1]
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "cifar100"}))
    assert table1.collapsed_in({"individual_acc": [70.0, 0.9], "run_dir": str(tmp_path)}) == [1]
    assert table1.collapsed_in({"individual_acc": [70.0, 60.0], "run_dir": str(tmp_path)}) == []
    assert table1.collapsed_in({"ensemble_acc": 50.0}) is None  # nothing to judge from


def test_table_writer_single_run_and_missing_method(table1, tmp_path):
    _, runs = _fake_runs()
    paths = table1.write_table(runs[:1], tmp_path, methods=["mixmo", "mixshare"], width=5, description="one")
    md = paths["markdown"].read_text()
    assert "| 70.0 | 66.0 | 10.0 |" in md  # one run: no std
    assert "81.9 ± 0.1 / 79.4 ± 0.2 / 8.2 ± 0.1" in md  # WRN-28-5 columns
    row = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))[1]
    assert row["runs"] == "0" and row["ensemble_acc_mean"] == ""


def test_mean_std(table1):
    assert table1.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = table1.mean_std([4.0])
    assert mean == 4.0 and math.isnan(std)
    assert all(math.isnan(v) for v in table1.mean_std([None, float("nan")]))


def test_runs_are_skipped_or_resumed(table1, tmp_path):
    calls = []

    def fake_train(argv):
        argv = list(argv)
        calls.append(argv)
        if "--resume" in argv:
            run_dir = Path(argv[argv.index("--resume") + 1])
        else:
            run_dir = Path(argv[argv.index("--out-dir") + 1]) / argv[argv.index("--run-name") + 1]
            assert argv[: len(table1.QUICK)] == table1.QUICK and argv[-2:] == ["--epochs", "1"]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"dataset": "synthetic", "depth": 10, "width": 1}))
        summary = {"ensemble_acc": 50.0, "mean_individual_acc": 40.0, "classifier_sharing": 70.0}
        summary.update(run_dir=str(run_dir), stopped_early=False)
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    runs = tmp_path / "out" / "runs"
    (runs / "mixmo-s1").mkdir(parents=True)
    (runs / "mixmo-s1" / "checkpoint.pt").write_bytes(b"")  # interrupted: to be resumed
    argv = ["--quick", "--seeds", "0", "1", "--methods", "mixmo", "unmix", "--out-dir", str(tmp_path / "out")]
    result = table1.main([*argv, "--", "--epochs", "1"], train=fake_train)
    assert len(calls) == 4 and calls[1] == ["--resume", str(runs / "mixmo-s1"), "--epochs", "1"]
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [
        ("mixmo", 0),
        ("mixmo", 1),
        ("unmix", 0),
        ("unmix", 1),
    ]
    assert "Quick CPU schedule: built-in synthetic data" in result["markdown"]

    calls.clear()
    again = table1.main([*argv, "--", "--epochs", "1"], train=fake_train)  # everything done: nothing trained
    assert calls == [] and again["markdown"] == result["markdown"]


def _run_cli(table1, argv, capsys):
    capsys.readouterr()
    try:
        code = table1.cli(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


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


@pytest.mark.parametrize(("argv", "option"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_one_line_exit_2_nothing_written(table1, tmp_path, capsys, argv, option):
    (tmp_path / "a-file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = [] if "--out-dir" in argv else ["--out-dir", str(tmp_path / "table")]
    cut = argv.index("--") if "--" in argv else len(argv)
    code, err = _run_cli(table1, ["--quick", "--seeds", "0", *out, *argv[:cut], *argv[cut:]], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no run started, nothing written


def test_a_run_that_cannot_resume_stops_the_table_in_one_line(table1, tmp_path, capsys):
    run = tmp_path / "table" / "runs" / "mixmo-s0"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a whole archive")
    argv = ["--quick", "--seeds", "0", "--methods", "mixmo", "--out-dir", str(tmp_path / "table")]
    code, err = _run_cli(table1, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: mixmo-s0: --resume: checkpoint ") and "truncated or damaged" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json"]
