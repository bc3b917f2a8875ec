"""mixshare_layers.evaluation.report: what a training run shows (CSV rows, TensorBoard tags, tables, shift files)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch

from mixshare_layers import MIMOWrapper
from mixshare_layers.evaluation import evaluate_uncertainty, report
from mixshare_layers.models import wide_resnet

METRICS = {"ensemble_acc": 0.5, "mean_individual_acc": 0.45, "individual_acc": [0.5, 0.4], "nll": 1.25, "ece": 0.031,
           "brier": 0.6, "disagreement": 0.25, "mean_confidence": 0.52, "count": 64}  # fmt: skip


@pytest.fixture(scope="module")
def shift_report() -> dict:
    """A real report of evaluate_uncertainty: a tiny wrapped WRN, an OOD set, two corruptions, a validation split."""
    torch.manual_seed(0)
    model = MIMOWrapper(wide_resnet(10, 1, num_classes=4), 2, preset="mixshare").eval()
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(24) % 4
    return evaluate_uncertainty(model, (images, labels), ood={"flipped": images.flip(-2)}, val=(images, labels),
                                corruptions=["contrast", "gaussian_blur"], severities=[1, 5])  # fmt: skip


def test_collapse_warning_names_the_collapsed_and_the_healthy_members() -> None:
    text = report.collapse_warning("test", [0.988, 0.004], [1], num_classes=20)
    assert text.startswith("WARNING: test: member(s) 1 collapsed: accuracy 0.40 % near chance (5.00 %)")
    assert "member(s) 0 reached 98.80 %" in text and "\n" not in text
    assert report.collapse_warning("test", [0.988, 0.004], [], num_classes=20) is None


def test_summary_metrics_keep_the_summary_units() -> None:
    out = report.summary_metrics(METRICS)
    assert out["ensemble_acc"] == 50.0 and out["individual_acc"] == [50.0, 40.0] and out["disagreement"] == 25.0
    assert out["mean_confidence"] == 52.0 and out["ece"] == 0.031 and out["nll"] == 1.25 and out["brier"] == 0.6
    evaluation = {"test": {**METRICS, "collapsed_members": [], "sharing": report.sharing_entries({"classifier": 7.0})}}
    summary = report.run_summary(evaluation, None, method="mixshare", epochs=3)
    assert summary["classifier_sharing"] == 7.0 and summary["encoder_sharing"] is None and summary["val"] is None
    assert summary["shift"] is None and summary["method"] == "mixshare" and summary["epochs"] == 3
    assert report.results_table({**summary, "ensemble_rule": "prob", "steps": 9, "train_time_s": 1.0,
                                 "images_per_s": 2.0}).count("\n") == 15  # fmt: skip


def test_metrics_csv_columns_rows_and_tensorboard_tags(tmp_path: Path) -> None:
    sharing = report.sharing_entries({"classifier": 40.0, "encoder": 100.0, "classifier_sum_ratio": 39.5})
    assert sharing == {"classifier_sharing": 40.0, "encoder_sharing": 100.0, "classifier_sharing_sum_ratio": 39.5,
                       "encoder_sharing_sum_ratio": None}  # fmt: skip
    columns = report.metrics_columns(2, ["val", "test"])
    assert columns[:6] == ["epoch", "step", "lr", "train_loss_nats", "images_per_s", "time_s"]
    assert columns[6:15] == [f"val_{c}" for c in ("ensemble_acc_pct", "mean_individual_acc_pct", "nll_nats",
                             "ece_pct", "brier", "disagreement_pct", "mean_confidence_pct", "acc_0_pct", "acc_1_pct")]
    row = {"epoch": 1, "step": 7, "lr": 0.0123456, **report.epoch_columns("test", METRICS, sharing)}
    assert row["test_ece_pct"] == pytest.approx(3.1) and row["test_acc_1_pct"] == 40.0 and row["test_nll_nats"] == 1.25
    tags = report.tensorboard_scalars(row, ["test"])
    assert tags["test/acc_member_1_pct"] == 40.0 and tags["test/nll_nats"] == 1.25
    assert tags["sharing/encoder_sharing_pct"] == 100.0 and "sharing/encoder_sharing_sum_ratio_pct" not in tags
    assert not any(t.startswith(("epoch", "lr", "step")) for t in tags)
    path = report.write_csv(tmp_path / "metrics.csv", report.metrics_columns(2, ["test"]), [row, {"epoch": 2}])
    rows = list(csv.DictReader(path.open()))
    assert rows[0]["lr"] == "0.01235" and rows[0]["test_nll_nats"] == "1.25" and rows[1]["lr"] == ""
    assert [report.csv_cell(v) for v in (123456.7, 0.000123456, None, "x", 3, math.inf)] == [
        123500.0, 0.0001235, "", "x", 3, math.inf]  # fmt: skip


def test_run_log_writes_nothing_until_an_epoch_and_only_when_enabled(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "run"
    log = report.RunLog(folder, ["test"], 2, tensorboard=False, progress=True)
    log.print("hello", "world")
    log.start_epoch(1, 3, 10)  # stdout is not a terminal here: no progress bar
    log.step(5, 5, 2.5, 0.1, 100.0)
    assert log.bar is None and not folder.exists() and capsys.readouterr().out == "hello\nworld\n"
    row = {"epoch": 1, "step": 10, "lr": 0.1, "train_loss_nats": 2.0, "images_per_s": 10.0, "time_s": 1.0,
           "epoch_time_s": 1.0, **report.epoch_columns("test", METRICS, report.sharing_entries(None))}  # fmt: skip
    folder.mkdir()
    log.epoch(row, "test", METRICS)
    out = capsys.readouterr().out
    assert out.startswith("epoch 1: loss 2.0000, test ensemble acc 50.00 % (members 50.00 / 40.00 %), NLL 1.250")
    assert [r["epoch"] for r in csv.DictReader((folder / "metrics.csv").open())] == ["1"] and log.rows == [row]
    quiet = report.RunLog(tmp_path / "other", ["test"], 2, rows=[row], enabled=False)
    quiet.print("nothing")
    quiet.epoch({**row, "epoch": 2})
    assert capsys.readouterr().out == "" and not (tmp_path / "other").exists() and len(quiet.rows) == 2
    assert report.epoch_line({**row, "epoch_time_s": 1.25}) == "epoch 1: loss 2.0000, 10 img/s, 1.2 s"


def test_run_log_tensorboard_opens_on_first_use(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    log = report.RunLog(tmp_path, ["test"], 2, purge_step=0)
    assert not (tmp_path / "tensorboard").exists()
    log.step(1, 1, 2.0, 0.1, 50.0)
    log.close()
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.filterwarnings("ignore:the fitted temperature .* lies on the edge")  # an untrained network
def test_shift_rows_table_summary_and_files(shift_report: dict, tmp_path: Path) -> None:
    rows, ood_rows = report.shift_rows(shift_report)
    cells = [(r["shift"], r["severity"]) for r in rows if r["temperature"] == 1.0]
    corrupted = [(c, s) for c in ("contrast", "gaussian_blur") for s in (1, 5)]
    assert cells == [("clean", 0), *corrupted, ("mean", 1), ("mean", 5), ("mean", "all")]
    assert len(rows) == 2 * len(cells)  # again at the fitted temperature
    assert rows[0]["ensemble_acc_pct"] == pytest.approx(100 * shift_report["clean"]["ensemble_acc"])
    assert rows[0]["nll_nats"] == shift_report["clean"]["nll"]
    assert {(r["ood_set"], r["score"]) for r in ood_rows} == {("flipped", s) for s, _ in report.OOD_SCORES}
    table = report.shift_table(shift_report, "flipped images")
    assert table.splitlines()[0] == "distribution shift (test set, corrupted on the fly; rule prob):"
    assert "OOD detection: flipped images images (positives)" in table and "mean over corruptions" in table
    assert "(fitted on the validation split)" in table.splitlines()[-1]
    digest = report.shift_summary(shift_report)
    assert set(digest) == {"clean", "corruption_mean", "ood", "temperature", "calibrated_clean"}
    assert set(digest["clean"]) == {"ensemble_acc_pct", "mean_individual_acc_pct", "nll_nats", "ece_pct"}
    assert set(digest["ood"]["flipped"]["msp"]) == {"auroc_pct", "aupr_pct", "fpr95_pct"}
    written = report.write_shift_report(tmp_path, shift_report, title="t", ood_set="flipped", corruption_seed=0)
    names = {p.name for p in written}
    assert {"uncertainty.json", "shift.csv", "ood.csv"} <= names and not list(tmp_path.glob(".*tmp*"))
    saved = json.loads((tmp_path / "uncertainty.json").read_text())  # strict JSON: no NaN
    assert saved["ood_set"] == "flipped" and saved["shift"]["contrast"]["5"]["count"] == 24
    header = next(csv.reader(io.StringIO((tmp_path / "shift.csv").read_text())))
    assert header[:3] == ["shift", "severity", "temperature"] and "mutual_information_nats" in header


def test_finite_makes_strict_json() -> None:
    value = {1: [math.nan, 1.5, (math.inf, "a")], "b": {"c": -math.inf}}
    assert report.finite(value) == {"1": [None, 1.5, [None, "a"]], "b": {"c": None}}
    json.dumps(report.finite(value), allow_nan=False)
