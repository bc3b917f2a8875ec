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


def test_progress_bar_spans_several_trainings(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdout", Terminal())
    monkeypatch.setattr("sys.stderr", Terminal())
    progress = report.Progress(2)
    seen = []
    for run in ("single", "mixshare"):
        progress.start_run(run)
        for epoch in (1, 2):
            progress.start_epoch(epoch, 2, 5)
            for done in range(1, 6):
                progress.step(done, loss="1.0")
                seen.append(progress.bar.n)
    assert seen == list(range(1, 21)) and progress.bar.total == 20  # one bar: 2 runs x 2 epochs x 5 steps
    assert progress.bar.desc.startswith("mixshare (2/2) epoch 2/2")
    progress.close()
    assert progress.bar is None and not report.Progress(1, enabled=False).enabled


def test_summary_metrics_name_their_units() -> None:
    out = report.summary_metrics(METRICS)
    assert out["ensemble_acc_pct"] == 50.0 and out["individual_acc_pct"] == [50.0, 40.0]
    assert out["disagreement_pct"] == 25.0 and out["mean_confidence_pct"] == 52.0
    assert out["ece_pct"] == pytest.approx(3.1) and out["nll_nats"] == 1.25 and out["brier"] == 0.6
    assert all(key == "brier" or key.endswith(("_pct", "_nats")) for key in out)  # every key names its unit
    evaluation = {"test": {**METRICS, "collapsed_members": [], "sharing": report.sharing_entries({"classifier": 7.0})}}
    summary = report.run_summary(evaluation, None, method="mixshare", epochs=3)
    assert summary["classifier_sharing_pct"] == 7.0 and summary["encoder_sharing_pct"] is None
    assert summary["shift"] is None and summary["val"] is None and summary["method"] == "mixshare"
    assert report.results_table({**summary, "ensemble_rule": "prob", "steps": 9, "train_time_s": 1.0,
                                 "images_per_s": 2.0}).count("\n") == 15  # fmt: skip


def test_renamed_summary_reads_the_keys_of_older_summaries() -> None:
    old = {"ensemble_acc": 50.0, "individual_acc": [50.0, 40.0], "nll": 1.25, "ece": 0.031, "brier": 0.6,
           "classifier_sharing": 7.0, "method": "mixmo", "val": {"ensemble_acc": 40.0, "ece": 0.5}}  # fmt: skip
    new = report.renamed_summary(old)
    assert new["ensemble_acc_pct"] == 50.0 and new["individual_acc_pct"] == [50.0, 40.0] and new["nll_nats"] == 1.25
    assert new["ece_pct"] == pytest.approx(3.1) and new["classifier_sharing_pct"] == 7.0 and new["method"] == "mixmo"
    assert new["val"] == {"ensemble_acc_pct": 40.0, "ece_pct": 50.0} and "ece" not in new
    evaluation = {"test": {**METRICS, "collapsed_members": [], "sharing": report.sharing_entries(None)}}
    today = report.run_summary(evaluation, None, method="mixshare")
    assert report.renamed_summary(today) == today  # today's names pass through unchanged


def _summary(method: str, m: int, acc: float, **shift) -> dict:
    evaluation = {"test": {**METRICS, "ensemble_acc": acc, "collapsed_members": [],
                           "sharing": report.sharing_entries(None)}}  # fmt: skip
    return report.run_summary(evaluation, shift or None, method=method, num_subnetworks=m, train_time_s=12.5,
                              test_ms_per_image=0.25, parameters=1234)  # fmt: skip


def test_comparison_table_puts_runs_side_by_side() -> None:
    table = report.comparison_table([_summary("single", 1, 0.9), _summary("mixshare", 2, 0.925)])
    lines = table.splitlines()
    assert "single network" in lines[0] and "mixshare (M = 2)" in lines[0]
    row = next(line for line in lines if line.startswith("ensemble accuracy (%)"))
    assert row.split()[-2:] == ["90.00", "92.50"]
    assert next(line for line in lines if line.startswith("ECE, calibrated")).split()[-2:] == ["-", "-"]  # no shift
    assert next(line for line in lines if line.startswith("parameters")).split()[-1] == "1,234"


def test_shift_table_shows_the_calibrated_ece_per_corruption(shift_report) -> None:
    with_cal = {**shift_report, "temperature": 0.5, "temperature_source": "model", "calibrated": shift_report}
    table = report.shift_table(with_cal, "flipped images")
    assert "ECE cal. (%)" in table and "the model's own" in table
    assert "ECE cal. (%)" not in report.shift_table({**shift_report, "temperature": None, "calibrated": None})
    digest = report.shift_summary(with_cal)
    assert digest["calibrated_corruption_mean"] == digest["corruption_mean"]  # the same metrics at both here


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
    assert log.bar.bar is None and not folder.exists() and capsys.readouterr().out == "hello\nworld\n"
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
    assert set(digest) == {"clean", "corruption_mean", "ood", "temperature", "calibrated_clean",
                           "calibrated_corruption_mean"}
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


def test_inference_ms_per_image_times_a_pass_and_restores_the_mode() -> None:
    from mixshare_layers.evaluation import inference_ms_per_image

    calls = []
    model = torch.nn.Linear(4, 2).train()
    model.register_forward_hook(lambda mod, inp, out: calls.append((inp[0].shape[0], mod.training)))
    ms = inference_ms_per_image(model, torch.randn(10, 4), batch_size=4)
    assert ms > 0 and model.training  # the mode is restored
    assert calls == [(4, False), (4, False), (4, False), (2, False)]  # one batch before the clock, then every image
    with pytest.raises(ValueError, match="batch_size"):
        inference_ms_per_image(model, torch.randn(2, 4), batch_size=0)
