"""examples/cifar100_wrn.py, run as a user runs it: ``python examples/cifar100_wrn.py ...`` in a child process.

Smoke runs and their files, exact resume (also after SIGKILL), the real CIFAR-100 loader on fabricated files, DDP
under torchrun, the learning-rate schedule, the shift report, the member-health warning, resuming from exactly the
file named, the fallback to checkpoint.prev.pt, refusing damaged or refused checkpoints, and every bad option answered
by one line, exit code 2 and nothing on disk. The pieces the script uses are tested on their own in
test_checkpoint_runs.py, test_evaluation_report.py, test_data_transforms.py and test_data_cifar.py.

A few tests change a library function inside the child (``sitecustomize.py`` on its ``PYTHONPATH``): to fabricate a
collapsed member, files with torchvision's md5 sums, or a file root cannot read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from checkpoint_cases import CASES, code_running_checkpoint, copy_run, make_case

from mixshare_layers.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "examples/cifar100_wrn.py"  # as the user types it, from the repository root
SUMMARY_KEYS = {
    "ensemble_acc_pct", "mean_individual_acc_pct", "individual_acc_pct", "nll_nats", "ece_pct", "brier",
    "disagreement_pct", "mean_confidence_pct", "test_ms_per_image", "parameters",
    "collapsed_members", "classifier_sharing_pct", "encoder_sharing_pct", "classifier_sharing_sum_ratio_pct",
    "encoder_sharing_sum_ratio_pct", "ensemble_rule", "epochs", "steps", "method", "seed", "depth", "width",
    "num_subnetworks", "dataset", "world_size", "run_dir", "train_time_s", "images_per_s", "val", "stopped_early",
    "shift",
}  # fmt: skip


def _env(patch: str | None = None, folder: Path | None = None, **extra: str) -> dict:
    """The child's environment: one thread, this checkout first on PYTHONPATH, and a sitecustomize with ``patch``."""
    path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    if patch is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sitecustomize.py").write_text(textwrap.dedent(patch))
        path.insert(0, str(folder))
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in path if p), **extra)


def _run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)  # fmt: skip


def _run_all(commands: list[tuple[list[str], dict | None]]) -> list[subprocess.CompletedProcess]:
    """Run several command lines at once (each child starts torch: seconds of CPU, mostly waiting on imports)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda c: _run(*c[0], env=c[1]), commands))


def _args(out: Path, name: str, *extra: str) -> list[str]:
    # the CPU always: the bitwise comparisons below need deterministic kernels, which cuDNN does not promise
    return ["--smoke", "--device", "cpu", "--out-dir", str(out), "--run-name", name, *extra]


def _train(out: Path, name: str, *extra: str, env: dict | None = None) -> dict:
    """A run that must succeed; its summary.json."""
    proc = _run(*_args(out, name, *extra), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / name / "summary.json").read_text())


def _resume(target: Path, *extra: str, env: dict | None = None) -> dict:
    proc = _run("--resume", str(target), *extra, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = target if target.is_dir() else target.parent
    return json.loads((run / "summary.json").read_text())


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _check_metrics_csv(run: Path, summary: dict) -> None:
    """metrics.csv: one unit per kind of quantity, in the column names; values rounded to 4 significant digits."""
    with (run / "metrics.csv").open() as fh:
        header = next(csv.reader(fh))
    evaluation = ["ensemble_acc_pct", "mean_individual_acc_pct", "nll_nats", "ece_pct", "brier", "disagreement_pct"]
    evaluation += ["mean_confidence_pct", "acc_0_pct", "acc_1_pct"]
    assert header == [
        "epoch", "step", "lr", "train_loss_nats", "images_per_s", "time_s", *(f"test_{c}" for c in evaluation),
        "classifier_sharing_pct", "encoder_sharing_pct", "classifier_sharing_sum_ratio_pct",
        "encoder_sharing_sum_ratio_pct",
    ]  # fmt: skip
    last = list(csv.DictReader((run / "metrics.csv").open()))[-1]
    same_unit = {  # the summary's value, in the CSV's unit
        "test_ensemble_acc_pct": summary["ensemble_acc_pct"],
        "test_ece_pct": summary["ece_pct"],
        "test_disagreement_pct": summary["disagreement_pct"],
        "test_nll_nats": summary["nll_nats"],
        "test_mean_confidence_pct": summary["mean_confidence_pct"],
        "test_acc_1_pct": summary["individual_acc_pct"][1],
        "encoder_sharing_pct": summary["encoder_sharing_pct"],
    }
    for column, value in same_unit.items():
        assert float(last[column]) == pytest.approx(value, rel=6e-4), column
    assert 0 < summary["mean_confidence_pct"] <= 100
    for column, text in last.items():
        if text and column not in ("epoch", "step"):
            digits = text.lower().split("e")[0].replace("-", "").replace(".", "").lstrip("0").rstrip("0")
            assert len(digits) <= 4, (column, text)


def _scalars(run: Path) -> dict:
    """TensorBoard's scalars of a run: ``{tag: [(step, value), ...]}``."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    acc = accumulator.EventAccumulator(str(events), size_guidance={accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _check_tensorboard(run: Path, rows: list[dict]) -> None:
    """Per evaluation: every member's accuracy, the disagreement and the sharing rates, as in metrics.csv."""
    scalars = _scalars(run)
    columns = {
        "test/acc_member_0_pct": "test_acc_0_pct",
        "test/acc_member_1_pct": "test_acc_1_pct",
        "test/disagreement_pct": "test_disagreement_pct",
        "test/ece_pct": "test_ece_pct",
        "test/nll_nats": "test_nll_nats",
        "sharing/classifier_sharing_pct": "classifier_sharing_pct",
        "sharing/encoder_sharing_pct": "encoder_sharing_pct",
    }
    assert set(columns) | {"train/loss_nats", "train/lr"} <= set(scalars), sorted(scalars)
    for tag, column in columns.items():
        assert [s for s, _ in scalars[tag]] == [int(r["step"]) for r in rows]  # one per evaluation
        for (_, value), row in zip(scalars[tag], rows, strict=True):
            assert value == pytest.approx(float(row[column]), rel=6e-4, abs=1e-6), tag


# ---------------------------------------------------------------------------------------------------------------
def test_smoke_writes_complete_run_directory(tmp_path: Path) -> None:
    summary = _train(tmp_path, "a", "--epochs", "2", "--eval-every", "1", "--tensorboard", "true", "--threads", "1")
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["epochs"] == 2 and summary["method"] == "mixshare" and len(summary["individual_acc_pct"]) == 2
    assert 0.0 <= summary["ensemble_acc_pct"] <= 100.0 and summary["nll_nats"] > 0 and 0.0 <= summary["brier"] <= 2.0
    assert summary["encoder_sharing_pct"] is not None and summary["classifier_sharing_pct"] is not None
    assert isinstance(summary["collapsed_members"], list)  # member health, checked at every evaluation
    run = Path(summary["run_dir"])
    assert run == tmp_path / "a"
    assert {"config.json", "metrics.csv", "checkpoint.pt", "summary.json"} <= {p.name for p in run.iterdir()}
    assert not list(run.glob(".*tmp*"))  # no temp file left behind
    cfg = json.loads((run / "config.json").read_text())
    # the recipe: lr = 0.1 x unique images per step / 128; smoke batches of 32 rows with 2 repeats -> 16 images
    assert cfg["lr_resolved"] == pytest.approx(0.1 * 16 / 128) and cfg["lr_schedule"] == "step"  # the paper's
    assert cfg["weight_decay"] == 6e-4 and cfg["nesterov"] is True and cfg["momentum"] == 0.9 and cfg["threads"] == 1
    assert cfg["mimo_config"]["input_repetition"] == 0.1 and cfg["mimo_config"]["unmix_mode"] == "fadeout"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    _check_metrics_csv(run, summary)
    _check_tensorboard(run, rows)
    ckpt = _ckpt(run)
    assert ckpt["epoch"] == 2 and ckpt["step"] == summary["steps"] and ckpt["config"] == cfg
    assert float(ckpt["model"]["progress"]) == pytest.approx((summary["steps"] - 1) / summary["steps"])
    # starting a run over an existing one is refused with the way to continue it
    _assert_one_line_error(_run(*_args(tmp_path, "a")), "already holds a run", f"--resume {run}")


def test_progress_bar_stays_out_of_logs(tmp_path: Path) -> None:
    """With stdout a file (a log), the progress bar is off even when asked for: no carriage-return frames."""
    proc = _run(*_args(tmp_path, "p", "--progress", "true", "--log-every", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stdout + proc.stderr and "epoch 1: loss" in proc.stdout


def test_a_collapsed_member_is_warned_at_evaluation(tmp_path: Path) -> None:
    """The script asks mixshare_layers.evaluation.collapsed_members at every evaluation (the decision itself is tested
    in test_metrics.py); a positive answer is printed as a warning and kept in the summary."""
    calls = tmp_path / "calls.jsonl"
    patch = f"""
        import json
        import mixshare_layers.evaluation as evaluation

        def judge(accs, num_classes):
            with open({str(calls)!r}, "a") as fh:
                fh.write(json.dumps([list(accs), num_classes]) + "\\n")
            return [1]

        evaluation.collapsed_members = judge
    """
    proc = _run(*_args(tmp_path, "c", "--epochs", "2", "--eval-every", "1"), env=_env(patch, tmp_path / "site"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(seen) == 2 and all(len(a) == 2 and k == 10 for a, k in seen)  # fractions, the smoke run's classes
    assert all(0.0 <= v <= 1.0 for a, _ in seen for v in a)
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["collapsed_members"] == [1]
    assert proc.stdout.count("WARNING: test: member(s) 1 collapsed") == 2
    assert re.search(r"\| collapsed members +\| 1 ", proc.stdout)


def test_baseline_trains_the_plain_backbone_beside_and_the_temperature_travels(tmp_path: Path) -> None:
    """--baseline: the plain backbone first (its own folder, the same steps), then the method, side by side; the
    method's temperature, fitted on the validation split, is in its checkpoint and used by its shift report."""
    args = ["--baseline", "true", "--val-split", "0.25", "--shift-eval", "true", "--shift-corruptions", "contrast",
            "--shift-severities", "3", "--synthetic-object-size", "0.5", "--synthetic-clutter", "0.7"]  # fmt: skip
    proc = _run(*_args(tmp_path, "b", *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, mixshare = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("b-single", "b"))
    assert (single["method"], single["num_subnetworks"], mixshare["method"]) == ("single", 1, "mixshare")
    assert single["steps"] == mixshare["steps"] > 0 and single["parameters"] < mixshare["parameters"]
    table = proc.stdout[proc.stdout.index("the plain backbone and mixshare (M = 2)"):]
    assert "single network" in table and "mixshare (M = 2)" in table
    row = next(line for line in table.splitlines() if line.startswith("ensemble accuracy (%)"))
    assert row.split()[-2:] == [f"{single['ensemble_acc_pct']:.2f}", f"{mixshare['ensemble_acc_pct']:.2f}"]
    fitted = float(re.search(r"calibrated on 24 validation images: temperature ([0-9.]+)", proc.stdout)[1])
    temperature = _ckpt(tmp_path / "b")["model"]["temperature"]  # (prob, logit), in the final checkpoint
    assert float(temperature[0]) == pytest.approx(fitted, abs=5e-4) and mixshare["shift"]["temperature"] == float(
        temperature[0])  # fmt: skip
    uncertainty = json.loads((tmp_path / "b" / "uncertainty.json").read_text())
    assert uncertainty["temperature_source"] == "model"  # the model's own, not fitted again
    assert json.loads((tmp_path / "b-single" / "uncertainty.json").read_text())["temperature_source"] == "val"
    assert "ECE cal. (%)" in proc.stdout and mixshare["shift"]["calibrated_corruption_mean"]["ece_pct"] >= 0


def test_no_calibrate_keeps_the_raw_probabilities(tmp_path: Path) -> None:
    args = ["--val-split", "0.25", "--shift-eval", "true", "--shift-corruptions", "contrast", "--shift-severities", "3"]
    proc = _run(*_args(tmp_path, "n", *args, "--no-calibrate"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "n" / "summary.json").read_text())
    assert summary["shift"]["temperature"] is None and summary["shift"]["calibrated_clean"] is None
    assert torch.equal(_ckpt(tmp_path / "n")["model"]["temperature"], torch.ones(2))
    assert "calibrated on" not in proc.stdout and not (tmp_path / "n-single").exists()


def test_single_method_with_val_split_and_logit_rule(tmp_path: Path) -> None:
    args = ["--method", "single", "--val-split", "0.25", "--ensemble-rule", "logit", "--tensorboard", "true"]
    args += ["--shift-eval", "true", "--shift-corruptions", "pixelate", "--shift-severities", "3"]
    summary = _train(tmp_path, "s", *args)
    # the shift evaluation, also at the temperature fitted on the validation split
    report = json.loads((tmp_path / "s" / "uncertainty.json").read_text())
    assert report["num_subnetworks"] == 1 and report["rule"] == "logit" and report["temperature"] > 0
    assert summary["shift"]["temperature"] == pytest.approx(report["temperature"])
    cal = report["calibrated"]["clean"]
    assert summary["shift"]["calibrated_clean"]["nll_nats"] == pytest.approx(cal["nll"], rel=1e-12)
    rows = list(csv.DictReader((tmp_path / "s" / "shift.csv").open()))
    assert len(rows) == 2 * 4  # clean, pixelate 3, mean of severity 3, mean of all: at T = 1 and at the fitted T
    by_temperature: dict[str, list] = {}
    for r in rows:
        by_temperature.setdefault(r["temperature"], []).append(r)
    assert len(by_temperature) == 2 and "1.0" in by_temperature
    raw, scaled = by_temperature.pop("1.0"), next(iter(by_temperature.values()))
    for a, b in zip(raw, scaled, strict=True):  # one network: a temperature never changes its predictions
        assert (a["shift"], a["severity"], a["ensemble_acc_pct"]) == (b["shift"], b["severity"], b["ensemble_acc_pct"])
        assert float(a["mutual_information_nats"]) == 0.0  # no members to disagree
    assert summary["classifier_sharing_pct"] is None and summary["encoder_sharing_pct"] is None
    assert len(summary["individual_acc_pct"]) == 1 and summary["disagreement_pct"] == 0.0
    assert summary["individual_acc_pct"][0] == pytest.approx(summary["ensemble_acc_pct"])
    assert summary["val"] is not None and summary["ensemble_rule"] == "logit"
    assert "heads.weight" not in _ckpt(Path(summary["run_dir"]))["model"]  # the plain backbone
    assert any((tmp_path / "s" / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_equals_uninterrupted_training(tmp_path: Path) -> None:
    straight = _train(tmp_path, "straight", "--epochs", "3")
    stopped = _train(tmp_path, "stopped", "--epochs", "3", "--stop-epoch", "1")
    assert stopped["stopped_early"] and stopped["epochs"] == 1
    resumed = _resume(tmp_path / "stopped")  # config restored from the checkpoint
    assert resumed["epochs"] == 3 and resumed["steps"] == straight["steps"]
    a, b = _ckpt(tmp_path / "straight"), _ckpt(tmp_path / "stopped")
    _assert_same_state(a["model"], b["model"])
    _assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    assert a["scheduler"] == b["scheduler"]
    for key in ("ensemble_acc_pct", "nll_nats", "ece_pct", "brier"):
        assert resumed[key] == straight[key]
    rows = list(csv.DictReader((tmp_path / "stopped" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_device_and_dataloader_paths_agree(tmp_path: Path) -> None:
    # the DataLoader path (a worker process) feeds the same batches as the on-device path
    fast, slow = _run_all([(_args(tmp_path, "fast"), None),
                           (_args(tmp_path, "slow", "--data-path", "loader", "--workers", "1"), None)])  # fmt: skip
    assert fast.returncode == slow.returncode == 0, fast.stderr[-2000:] + slow.stderr[-2000:]
    _assert_same_state(_ckpt(tmp_path / "fast")["model"], _ckpt(tmp_path / "slow")["model"])


def _lr_factors(run: Path, steps: int) -> list[float]:
    lr = json.loads((run / "config.json").read_text())["lr_resolved"]
    return [value / lr for _, value in sorted(_scalars(run)["train/lr"])][:steps]


def test_lr_schedule_warmup_then_steps_or_cosine(tmp_path: Path) -> None:
    """Per step: a linear warmup over the first epoch, then x gamma at 25 / 50 / 75 % (the paper) or a half cosine
    to 0 (--quick's); TensorBoard's train/lr after step s is the lr of step s + 1."""
    args = ["--epochs", "4", "--log-every", "1", "--tensorboard", "true"]  # 6 steps per epoch, 24 in all
    step, cosine = _run_all([(_args(tmp_path, "step", *args), None),
                             (_args(tmp_path, "cos", *args, "--lr-schedule", "cosine"), None)])  # fmt: skip
    assert step.returncode == cosine.returncode == 0, step.stderr[-2000:] + cosine.stderr[-2000:]
    expected = [min(1.0, (s + 1) / 6) * 0.1 ** sum(s >= m for m in (6, 12, 18)) for s in range(1, 25)]
    assert _lr_factors(tmp_path / "step", 24) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    expected = [min(1, (s + 1) / 6) * 0.5 * (1 + math.cos(math.pi * min(max(s - 6, 0) / 18, 1))) for s in range(1, 25)]
    assert _lr_factors(tmp_path / "cos", 24) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_quick_schedule_keeps_learning_after_four_fifths_of_its_epochs(tmp_path: Path) -> None:
    """--quick: the cosine schedule; the paper's steps (for full runs) would be at 1/1000 by then."""
    tiny = ["--synthetic-train", "160", "--synthetic-test", "32", "--synthetic-size", "16", "--batch-size", "32"]
    tiny += ["--shift-eval", "false", "--val-split", "0", "--tensorboard", "false", "--eval-every", "0"]
    common = ["--quick", "--baseline", "false", "--device", "cpu", "--out-dir", str(tmp_path), *tiny]
    quick, paper = _run_all([([*common, "--run-name", "q"], None),
                             ([*common, "--run-name", "p", "--lr-schedule", "step"], None)])  # fmt: skip
    assert quick.returncode == paper.returncode == 0, quick.stderr[-2000:] + paper.stderr[-2000:]
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["lr_schedule"] == "cosine" and cfg["epochs"] >= 5 and cfg["depth"] == 10 and cfg["baseline"] is False
    at = round(0.8 * cfg["epochs"]) - 1  # the row of the epoch at four fifths
    for name, check in (("q", lambda f: f > 0.05), ("p", lambda f: f == pytest.approx(1e-3))):
        rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
        assert check(float(rows[at]["lr"]) / cfg["lr_resolved"]), (name, rows[at]["lr"])


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    _train(tmp_path, "nan", "--epochs", "3", "--stop-epoch", "1")
    ckpt = tmp_path / "nan" / "checkpoint.pt"
    before = ckpt.read_bytes()
    diverged, first = _run_all([(["--resume", str(tmp_path / "nan"), "--lr", "1e30", "--log-every", "1"], None),
                                (_args(tmp_path, "first", "--lr", "1e30", "--log-every", "1"), None)])  # fmt: skip
    line = _assert_one_line_error(diverged, "non-finite training loss")
    assert re.search(rf"epoch 2, step \d+ of \d+.*\({ckpt}, epoch 1\) is intact", line), line
    assert ckpt.read_bytes() == before and _ckpt(tmp_path / "nan")["epoch"] == 1
    # diverging in the first epoch: there is no checkpoint to point at
    line = _assert_one_line_error(first, "no checkpoint was written yet")
    assert "is intact" not in line and not (tmp_path / "first" / "checkpoint.pt").exists()


def test_bad_options(tmp_path: Path) -> None:
    procs = _run_all([
        (_args(tmp_path, "x", "--batch-size", "33"), None),
        (_args(tmp_path, "y", "--method", "single", "--alpha", "1"), None),
        (_args(tmp_path, "z", "--unmix-mode", "sideways"), None),
        (["--resume", str(tmp_path / "nowhere")], None),
        (["--resume", str(tmp_path / "nowhere"), "--run-name", "x"], None),
    ])  # fmt: skip
    patterns = [r"--batch-size \(33\) must be a positive multiple", "--method single has no MIMO options, but got"]
    patterns += ["unmix_mode must be one of", r"--resume: .*nowhere does not exist", "--resume continues the run in "
                 "its own folder: leave out --out-dir and --run-name"]  # fmt: skip
    assert "but got alpha" in procs[1].stderr
    for proc, pattern in zip(procs, patterns, strict=True):
        assert re.search(pattern, _assert_one_line_error(proc)), (pattern, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written by runs that never started


# ---------------------------------------------------------------------------------------------------------------
def test_shift_evaluation_matches_a_recomputation_by_hand(tmp_path: Path) -> None:
    from mixshare_layers.checkpoint import load_model
    from mixshare_layers.data import SyntheticImageDataset, synthetic_ood_dataset
    from mixshare_layers.evaluation.shift import corrupt

    args = ["--shift-eval", "true", "--shift-corruptions", "contrast,gaussian_noise", "--shift-severities", "2,5"]
    summary = _train(tmp_path, "shift", *args, "--data-seed", "3")
    run = tmp_path / "shift"
    assert {"uncertainty.json", "shift.csv", "ood.csv"} <= {p.name for p in run.iterdir()}
    assert not list(run.glob(".*tmp*"))
    rows = list(csv.DictReader((run / "shift.csv").open()))
    cells = [(r["shift"], r["severity"]) for r in rows]
    corrupted = [(c, s) for c in ("contrast", "gaussian_noise") for s in ("2", "5")]
    assert cells == [("clean", "0"), *corrupted, ("mean", "2"), ("mean", "5"), ("mean", "all")]
    # the clean row: the numbers of the run's own evaluation, to the CSV's 4 digits
    assert float(rows[0]["ensemble_acc_pct"]) == pytest.approx(summary["ensemble_acc_pct"], rel=1e-3)
    assert float(rows[0]["nll_nats"]) == pytest.approx(summary["nll_nats"], rel=1e-3)
    assert float(rows[0]["ece_pct"]) == pytest.approx(summary["ece_pct"], rel=1e-3)
    assert summary["shift"]["clean"]["ensemble_acc_pct"] == pytest.approx(summary["ensemble_acc_pct"], rel=1e-9)

    # by hand: the saved model, the same test images corrupted with the same seed and positions, normalised with
    # the training images' statistics, the ensemble's mean probability in float64
    model, checkpoint = load_model(run / "checkpoint.pt")
    cfg = checkpoint["config"]
    kw = dict(num_classes=cfg["synthetic_classes"], image_size=cfg["synthetic_size"], seed=3)
    train = SyntheticImageDataset(cfg["synthetic_train"], train=True, noise=cfg["synthetic_noise"], **kw)
    test = SyntheticImageDataset(cfg["synthetic_test"], train=False, noise=cfg["synthetic_noise"], **kw)
    mean = train.data.double().mean(dim=(0, 2, 3)).view(1, -1, 1, 1) / 255
    std = train.data.double().var(dim=(0, 2, 3), unbiased=False).sqrt().view(1, -1, 1, 1) / 255

    def probs(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(((images.double() - mean) / std).float()).double().softmax(-1).mean(1)

    clean = test.data.float() / 255
    for name, severity in (("contrast", 5), ("gaussian_noise", 2)):
        p = probs(corrupt(clean, name, severity, seed=3, index=torch.arange(len(test))))
        row = rows[cells.index((name, str(severity)))]
        acc = 100 * float((p.argmax(-1) == test.targets).double().mean())
        assert float(row["ensemble_acc_pct"]) == pytest.approx(acc, abs=0.01)
        nll = -p[torch.arange(len(test)), test.targets].log().mean()
        assert float(row["nll_nats"]) == pytest.approx(float(nll), rel=1e-3)
    # OOD: unseen classes are the positives; the AUROC of the max probability is P(score_ood > score_id), ties half
    ood_rows = {r["score"]: r for r in csv.DictReader((run / "ood.csv").open())}
    assert set(ood_rows) == {"msp", "entropy", "mutual_information"}
    s_id = -probs(clean).amax(-1)
    s_ood = -probs(synthetic_ood_dataset(test, len(test)).data.float() / 255).amax(-1)
    gt = (s_ood[:, None] > s_id[None, :]).double().mean() + 0.5 * (s_ood[:, None] == s_id[None, :]).double().mean()
    assert float(ood_rows["msp"]["auroc_pct"]) == pytest.approx(100 * float(gt), abs=0.01)
    assert summary["shift"]["ood"]["synthetic"]["msp"]["auroc_pct"] == pytest.approx(100 * float(gt), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
def _fake_cifar100(root: Path, n_train: int, n_test: int) -> dict[str, str]:
    """A tiny CIFAR-100 in torchvision's on-disk format; returns the md5 of each file."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    # The real files are Python 2 pickles whose keys (and label names) are byte strings; torchvision unpickles
    # them with encoding="latin1", which turns those into str. A Python 3 pickle with str keys loads identically.
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {
            "filenames": [f"img{i}.png" for i in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": (torch.arange(n) % 100).tolist(),
            "coarse_labels": (torch.arange(n) % 20).tolist(),
            "data": torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=g).numpy(),  # rows: R, G, B planes
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test", "meta")}


def _md5_patch(md5: dict[str, str]) -> str:
    """torchvision checks every file against the md5 sums of the real data sets (class attributes); fabricated files
    cannot match them, so the child is told the sums of the test's own files: the script then goes through
    torchvision's real loaders, integrity checks included."""
    return f"""
        import torchvision.datasets as datasets

        md5 = {md5!r}
        datasets.CIFAR100.train_list = [["train", md5["train"]]]
        datasets.CIFAR100.test_list = [["test", md5["test"]]]
        datasets.CIFAR100.meta = {{**datasets.CIFAR100.meta, "md5": md5["meta"]}}
        if "svhn" in md5:
            test = datasets.SVHN.split_list["test"]
            datasets.SVHN.split_list = {{**datasets.SVHN.split_list, "test": [*test[:2], md5["svhn"]]}}
    """


def test_real_cifar100_loader_on_fabricated_files(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    data = tmp_path / "data"
    md5 = _fake_cifar100(data, 128, 50)
    cifar = ["--dataset", "cifar100", "--data-dir", str(data)]
    shift = ["--shift-eval", "true", "--shift-corruptions", "contrast", "--shift-severities", "5"]
    env = _env(_md5_patch(md5), tmp_path / "site")
    auto, missing = _run_all([(_args(tmp_path, "c", *cifar, *shift), env),
                              (_args(tmp_path, "m", *cifar, *shift, "--ood", "svhn"), env)])  # fmt: skip
    # --ood auto without SVHN at hand: says why there is no OOD evaluation, and goes on
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "note: no OOD evaluation" in auto.stdout and "--download" in auto.stdout and "--ood none" in auto.stdout
    assert not (tmp_path / "c" / "ood.csv").exists() and (tmp_path / "c" / "shift.csv").exists()
    # --ood svhn asked for and missing: refused before anything is written
    line = _assert_one_line_error(missing, "--ood svhn: no SVHN test split in --data-dir")
    assert re.search(r"test_32x32\.mat", line) and not (tmp_path / "m").exists()
    # SVHN's test split, fabricated in its .mat layout (X: 32 x 32 x 3 x N, y: N x 1, digits 1..10)
    scipy_io = pytest.importorskip("scipy.io")
    g = torch.Generator().manual_seed(1)
    svhn = {"X": torch.randint(0, 256, (32, 32, 3, 40), dtype=torch.uint8, generator=g).numpy()}
    svhn["y"] = (torch.arange(40) % 10 + 1).view(40, 1).numpy()
    scipy_io.savemat(data / "test_32x32.mat", svhn)
    md5["svhn"] = hashlib.md5((data / "test_32x32.mat").read_bytes()).hexdigest()
    env = _env(_md5_patch(md5), tmp_path / "site")
    summary = _train(tmp_path, "s", *cifar, *shift, "--ood", "svhn", "--ood-samples", "30", env=env)
    assert summary["dataset"] == "cifar100"
    assert set(summary["shift"]["ood"]) == {"svhn"} and 0 <= summary["shift"]["ood"]["svhn"]["msp"]["auroc_pct"] <= 100
    assert {r["ood_set"] for r in csv.DictReader((tmp_path / "s" / "ood.csv").open())} == {"svhn"}
    assert json.loads((tmp_path / "s" / "config.json").read_text())["ood_resolved"] == "svhn"
    ckpt = _ckpt(Path(summary["run_dir"]))
    assert ckpt["model"]["heads.weight"].shape[:2] == (2, 100)  # 100 classes
    assert ckpt["step"] == 128 // 16  # 128 training images, 16 unique per step


def test_missing_cifar100_names_both_options(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    proc = _run(*_args(tmp_path, "m", "--dataset", "cifar100", "--data-dir", str(tmp_path / "empty")))
    line = _assert_one_line_error(proc, "error: CIFAR-100 not found")
    assert line.startswith("error: CIFAR-100 not found") and re.search(r"--data-dir.*--download", line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
def test_sigkill_then_resume_from_last_complete_checkpoint(tmp_path: Path) -> None:
    args = ["--synthetic-train", "64", "--epochs", "20"]
    straight = subprocess.Popen([sys.executable, SCRIPT, *_args(tmp_path, "straight", *args)], cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    proc = subprocess.Popen([sys.executable, SCRIPT, *_args(tmp_path, "killed", *args)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.15)  # somewhere in a later epoch, possibly while a checkpoint is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = _ckpt(tmp_path / "killed")["epoch"]  # the file on disk is always a complete checkpoint
    assert 1 <= done < 20
    resumed = _resume(tmp_path / "killed")
    assert straight.wait(timeout=300) == 0 and resumed["epochs"] == 20
    _assert_same_state(_ckpt(tmp_path / "killed")["model"], _ckpt(tmp_path / "straight")["model"])  # bitwise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_gloo(tmp_path: Path) -> None:
    for attempt in range(2):  # a free port can be taken by another process before torchrun binds it: retry once
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
            SCRIPT, *_args(tmp_path, f"ddp{attempt}", "--epochs", "2", "--device", "cpu"),
            "--shift-eval", "true", "--shift-corruptions", "gaussian_blur", "--shift-severities", "4",
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=240)
        # retried once, and only for two failures outside the script: a port taken between _free_port() and
        # torchrun's bind, and gloo's rare abort while a process exits (an upstream teardown race)
        transient = ("address already in use", "terminate called without an active exception")
        if proc.returncode == 0 or not any(t in proc.stderr.lower() for t in transient):
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / f"ddp{attempt}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["rank_max_abs_diff"] == 0.0  # identical weights and BN statistics on both ranks
    # the shift evaluation gathers both ranks' halves of the test set: the run's own numbers, on every image
    report = json.loads((run / "uncertainty.json").read_text())
    assert report["clean"]["count"] == report["shift"]["gaussian_blur"]["4"]["count"] == 64
    assert 100 * report["clean"]["ensemble_acc"] == pytest.approx(summary["ensemble_acc_pct"], rel=1e-9)
    assert report["clean"]["nll"] == pytest.approx(summary["nll_nats"], rel=1e-6)
    assert {"config.json", "metrics.csv", "checkpoint.pt", "summary.json"} <= {p.name for p in run.iterdir()}
    ckpt = _ckpt(run)
    assert len(ckpt["rng"]) == 2  # one RNG state per rank
    assert not torch.equal(ckpt["rng"][0]["mix"], ckpt["rng"][1]["mix"])  # independent masks per rank
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lr_resolved"] == pytest.approx(0.1 * 16 * 2 / 128)  # unique images of both ranks
    assert summary["steps"] == 2 * (96 // 2 // 16)  # each rank sees its half of the data


# ---------------------------------------------------------------------------------------------------------------
# resume from exactly the file named; damaged files; the previous checkpoint
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A straight 3-epoch run and the same run stopped after epoch 1 (kept pristine: tests copy it)."""
    root = tmp_path_factory.mktemp("runs")
    procs = _run_all([(_args(root, "straight", "--epochs", "3"), None),
                      (_args(root, "stopped", "--epochs", "3", "--stop-epoch", "1"), None)])  # fmt: skip
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    return {"straight": root / "straight", "stopped": root / "stopped"}


def test_resume_from_the_file_named(runs, tmp_path: Path) -> None:
    run = copy_run(runs["stopped"], tmp_path / "run")
    (run / "checkpoint.pt").rename(run / "epoch1.pt")  # a kept copy; no checkpoint.pt in the folder
    _assert_one_line_error(_run("--resume", str(run)), "config.json but no checkpoint.pt", "nothing to resume")
    summary = _resume(run / "epoch1.pt")
    assert summary["epochs"] == 3 and (run / "epoch1.pt").is_file()
    _assert_same_state(_ckpt(run)["model"], _ckpt(runs["straight"])["model"])  # bitwise, as if never stopped
    assert load_checkpoint(run / "checkpoint.prev.pt")["epoch"] == 2
    # a file that would overwrite a good checkpoint.pt of the folder is refused, never silently used
    before = (run / "checkpoint.pt").read_bytes()
    _assert_one_line_error(_run("--resume", str(run / "epoch1.pt")), "would overwrite", str(run / "checkpoint.pt"))
    assert (run / "checkpoint.pt").read_bytes() == before


def test_damaged_checkpoint_names_the_previous_one_and_the_command(runs, tmp_path: Path) -> None:
    run = copy_run(runs["stopped"], tmp_path / "run")
    _resume(run, "--stop-epoch", "2")  # checkpoint.pt = epoch 2, checkpoint.prev.pt = epoch 1
    assert verify_checkpoint(run / "checkpoint.prev.pt") and _ckpt(run)["epoch"] == 2
    make_case("flipped_tensor_byte", run / "checkpoint.pt", run / "checkpoint.pt", tmp_path / "marker")
    damaged = (run / "checkpoint.pt").read_bytes()
    line = _assert_one_line_error(_run("--resume", str(run)), str(run / "checkpoint.pt"), "do not match the SHA-256")
    prev = run / "checkpoint.prev.pt"
    assert line.endswith(f"previous checkpoint {prev} is intact: resume from it with python {SCRIPT} --resume {prev}")
    assert (run / "checkpoint.pt").read_bytes() == damaged  # never trained from, never touched
    summary = _resume(prev)  # the fallback, named explicitly: the command of the message
    assert summary["epochs"] == 3
    _assert_same_state(_ckpt(run)["model"], _ckpt(runs["straight"])["model"])
    assert load_checkpoint(prev)["epoch"] == 2  # the damaged file was never kept


def test_checkpoint_without_digest_from_an_older_version_resumes(runs, tmp_path: Path) -> None:
    run = copy_run(runs["stopped"], tmp_path / "run")
    old = load_checkpoint(run / "checkpoint.pt")
    del old["config"]  # before checkpoints held their config: it comes from config.json
    torch.save(old, run / "checkpoint.pt")  # plain torch.save: no digest
    proc = _run("--resume", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "carries no digest" in proc.stdout
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    _assert_same_state(_ckpt(run)["model"], _ckpt(runs["straight"])["model"])


def test_checkpoint_holds_its_config(runs, tmp_path: Path) -> None:
    ckpt = load_checkpoint(runs["stopped"] / "checkpoint.pt", require_digest=True)
    saved = json.loads((runs["stopped"] / "config.json").read_text())
    assert ckpt["config"] == saved and ckpt["epoch"] == 1
    run = copy_run(runs["stopped"], tmp_path / "run")
    (run / "config.json").unlink()  # the checkpoint alone is enough to continue
    assert _resume(run / "checkpoint.pt", "--stop-epoch", "2")["epochs"] == 2


RESUME_CASES = [*CASES, "unreadable", "missing_file", "mismatched_model"]
_UNREADABLE = """
    from mixshare_layers.checkpoint import store

    def denied(*args, **kwargs):  # root reads any file: make opening it fail as it would for a user
        raise PermissionError(13, "Permission denied")

    store.open = denied
"""


@pytest.fixture(scope="module")
def bad_resumes(runs, tmp_path_factory) -> dict[str, tuple]:
    """Every case of RESUME_CASES, run at once: ``{case: (process, run folder, marker, listing before)}``."""
    prepared, commands = {}, []
    for case in RESUME_CASES:
        tmp = tmp_path_factory.mktemp(case)
        run, marker, env = copy_run(runs["stopped"], tmp / "run"), tmp / "marker", None
        target = run / "checkpoint.pt"
        if case in CASES:
            make_case(case, runs["stopped"] / "checkpoint.pt", target, marker)
        elif case == "unreadable" and os.geteuid() != 0:
            target.chmod(0)
        elif case == "unreadable":
            env = _env(_UNREADABLE, tmp / "site")
        elif case == "mismatched_model":
            ckpt = load_checkpoint(target)
            ckpt["model"]["heads.weight"] = torch.zeros(2, 10, 7)
            save_checkpoint(target, ckpt)
        listing = {p.name: (p.read_bytes() if p.is_file() and case != "unreadable" else None) for p in run.iterdir()}
        prepared[case] = (run, marker, listing)
        commands.append((["--resume", str(run / "nothing.pt") if case == "missing_file" else str(run)], env))
    return {case: (proc, *prepared[case]) for case, proc in zip(RESUME_CASES, _run_all(commands), strict=True)}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_refuses_a_bad_checkpoint_in_one_line(bad_resumes, case: str) -> None:
    proc, run, marker, listing = bad_resumes[case]
    expected = {
        "unreadable": r"cannot be read \(Permission denied\)",
        "missing_file": "does not exist",
        "mismatched_model": "does not fit the model",
        "missing_model": "lacks|no 'model'|state_dict under 'model'",
        "a_folder": "is a folder, not a file",
    }.get(case, CASES.get(case))
    line = _assert_one_line_error(proc, "--resume")
    assert re.search(expected, line), line
    assert str(run) in line
    assert not marker.exists()
    after = {p.name: (p.read_bytes() if p.is_file() and case != "unreadable" else None) for p in run.iterdir()}
    assert after == listing  # nothing trained, nothing written


def test_code_running_checkpoint_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = code_running_checkpoint(tmp_path / "evil.pt", marker, epoch=1, config={"depth": 10})
    procs = _run_all([(["--resume", str(evil)], None),
                      (["--resume", str(evil)], _env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))])  # fmt: skip
    for proc in procs:
        _assert_one_line_error(proc, str(evil), "refused", "builtins.exec")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# every bad option: one line, exit code 2, nothing on disk
# ---------------------------------------------------------------------------------------------------------------
BAD_OPTIONS = [
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--base-lr", "0"], "--base-lr"),
    (["--weight-decay", "-0.0001"], "--weight-decay"),
    (["--label-smoothing", "2"], "--label-smoothing"),
    (["--synthetic-classes", "0"], "--synthetic-classes"),
    (["--synthetic-size", "0"], "--synthetic-size"),
    (["--synthetic-train", "0"], "--synthetic-train"),
    (["--synthetic-test", "0"], "--synthetic-test"),
    (["--synthetic-noise", "-1"], "--synthetic-noise"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--device", "bogus"], "--device"),
    (["--device", "meta"], "--device"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "x"], "--epochs"),
    (["--batch-size", "33"], "--batch-size"),
    (["--batch-repetition", "0"], "--batch-repetition"),
    (["--num-subnetworks", "0"], "--num-subnetworks"),
    (["--depth", "11"], "--depth"),
    (["--width", "0"], "--width"),
    (["--momentum", "1.5"], "--momentum"),
    (["--momentum", "0"], "--nesterov"),
    (["--lr-gamma", "0"], "--lr-gamma"),
    (["--milestones", "0.5,0.2"], "--milestones"),
    (["--val-split", "1"], "--val-split"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--log-every", "0"], "--log-every"),
    (["--workers", "-1"], "--workers"),
    (["--stop-epoch", "-1"], "--stop-epoch"),
    (["--threads", "-1"], "--threads"),
    (["--seed", "-1"], "--seed"),
    (["--data-seed", "-3"], "--data-seed"),
    (["--run-name", "a/b"], "--run-name"),
    (["--run-name", ".."], "--run-name"),
    (["--method", "bogus"], "--method"),
    (["--method", "single", "--alpha", "1"], "--method single"),
    (["--alpha", "nan"], "--alpha"),
    (["--unmix-mode", "sideways"], "--unmix-mode"),
    (["--cutmix-prob", "2"], "--cutmix-prob"),
    (["--fadeout-end", "0"], "--fadeout-end"),
    (["--amp", "fp8"], "--amp"),
    (["--nesterov", "maybe"], "--nesterov"),
    (["--quick"], "--quick"),  # with --smoke
    (["--baseline", "true", "--method", "single"], "--baseline"),
    (["--baseline", "true", "--resume", "{tmp}/missing-run"], "--resume"),
    (["--synthetic-object-size", "0"], "--synthetic-object-size"),
    (["--synthetic-clutter", "-1"], "--synthetic-clutter"),
    (["--shift-corruptions", "fog"], "--shift-corruptions"),
    (["--shift-severities", "0"], "--shift-severities"),
    (["--shift-severities", "3,1"], "--shift-severities"),
    (["--ood", "bogus"], "--ood"),
    (["--ood", "synthetic", "--dataset", "cifar100"], "--ood synthetic"),
    (["--ood-samples", "-1"], "--ood-samples"),
    (["--bogus-option"], "--bogus-option"),
    (["--dataset", "cifar100", "--data-dir", "{tmp}/no-data"], "--data-dir"),
    (["--resume", "{tmp}/missing-run"], "--resume"),
    (["--out-dir", "{tmp}/a-file/runs"], "--out-dir"),
    (["--out-dir", "{unwritable}"], "--out-dir"),
    (["--device", "cuda"], "--device"),
    (["--device", "cuda:99"], "--device"),
]
IDS = [" ".join(a) for a, _ in BAD_OPTIONS]


def _unwritable_folder(tmp_path: Path) -> Path | None:
    """A folder in which nothing can be created, even by root (a read-only folder, or /proc); None if none."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder / "runs"
    if sys.platform.startswith("linux") and Path("/proc").is_dir():
        return Path("/proc/mixshare-test-runs")
    return None


@pytest.fixture(scope="module")
def bad_options(tmp_path_factory) -> dict[str, tuple]:
    """Every command line of BAD_OPTIONS, run at once: ``{id: (process, folder, listing before)}`` (None: skipped)."""
    out, commands = {}, []
    for ident, (argv, _) in zip(IDS, BAD_OPTIONS, strict=True):
        if argv[0] == "--device" and argv[1].startswith("cuda") and torch.cuda.is_available():
            out[ident] = None  # a GPU is available here
            continue
        tmp = tmp_path_factory.mktemp("bad")
        (tmp / "a-file").write_text("not a folder")
        unwritable = _unwritable_folder(tmp) if "{unwritable}" in argv else tmp
        if unwritable is None:
            out[ident] = None
            continue
        argv = [a.replace("{unwritable}", str(unwritable)).replace("{tmp}", str(tmp)) for a in argv]
        out_dir = [] if "--out-dir" in argv else ["--out-dir", str(tmp / "runs")]
        out[ident] = (tmp, sorted(p.name for p in tmp.iterdir()))
        commands.append((ident, ["--smoke", "--run-name", "r", *out_dir, *argv]))
    procs = dict(zip([ident for ident, _ in commands], _run_all([(argv, None) for _, argv in commands]), strict=True))
    return {ident: None if out[ident] is None else (procs[ident], *out[ident]) for ident in IDS}


@pytest.mark.parametrize(("argv", "option"), BAD_OPTIONS, ids=IDS)
def test_bad_option_one_line_exit_2_nothing_written(bad_options, argv, option) -> None:
    result = bad_options[" ".join(argv)]
    if result is None:
        pytest.skip("a GPU is available here, or no folder is read-only for root here")
    proc, tmp, before = result
    _assert_one_line_error(proc, option)
    assert sorted(p.name for p in tmp.iterdir()) == before  # no run folder, nothing else


def test_command_line_exit_code_and_one_line(tmp_path: Path) -> None:
    proc = _run("--smoke", "--lr", "-1", "--out-dir", str(tmp_path / "runs"))
    assert proc.returncode == 2 and proc.stderr == "error: --lr must be a finite number in (0, inf), got -1\n"
    assert not (tmp_path / "runs").exists()
