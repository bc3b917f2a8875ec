"""evaluate_uncertainty, flatten_report, the plots, the OOD data sets and the distributed gathering."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from mixshare_layers import MIMOWrapper, SyntheticImageDataset
from mixshare_layers.data import load_svhn, synthetic_ood_dataset
from mixshare_layers.evaluation import (
    METRIC_UNITS,
    UncertaintyMetrics,
    evaluate_uncertainty,
    fit_temperature,
    flatten_report,
    ood_detection_metrics,
    plot_reliability_diagram,
    plot_uncertainty_report,
    uncertainty_scores,
)
from mixshare_layers.evaluation.shift import corrupt
from mixshare_layers.models import wide_resnet

MEAN, STD = 0.5, 0.25


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = MIMOWrapper(wide_resnet(10, 1, num_classes=4), num_subnetworks=2, preset="mixshare").eval()
    # a few BN statistics so that logits differ between images
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 2, 3, 32, 32))
    model.eval()
    test = SyntheticImageDataset(48, num_classes=4, train=False)
    val = SyntheticImageDataset(40, num_classes=4, train=True)
    ood = synthetic_ood_dataset(test, 24)
    return model, test, val, ood


def _direct(model, x, y, corruption=None, severity=1, temperature=1.0):
    xs = x.float() / 255
    if corruption:
        xs = corrupt(xs, corruption, severity, seed=0)
    with torch.no_grad():
        logits = model(_normalise(xs))
    acc = UncertaintyMetrics(2, 4, temperature=temperature)
    acc.update(logits, y)
    return acc, logits


def test_report_equals_the_metrics_computed_by_hand(setup):
    model, test, val, ood = setup
    report = evaluate_uncertainty(
        model,
        (test.data, test.targets),
        ood={"synthetic": ood.data},
        val=(val.data, val.targets),
        corruptions=["gaussian_noise", "pixelate"],
        severities=[2, 5],
        preprocess=_normalise,
        batch_size=17,  # uneven batches
    )
    acc, _ = _direct(model, test.data, test.targets)
    clean = acc.compute()
    for key in ("ensemble_acc", "nll", "ece", "adaptive_ece", "classwise_ece", "aurc", "mutual_information"):
        assert report["clean"][key] == pytest.approx(clean[key], abs=1e-6), key
    # the temperature is fitted on the validation logits
    with torch.no_grad():
        val_logits = model(_normalise(val.data.float() / 255))
    t = fit_temperature(val_logits, val.targets)
    assert report["temperature"] == pytest.approx(t, rel=1e-6)
    cal, _ = _direct(model, test.data, test.targets, temperature=t)
    assert report["calibrated"]["clean"]["nll"] == pytest.approx(cal.compute()["nll"], abs=1e-6)
    # OOD: the clean scores against the OOD set's
    with torch.no_grad():
        ood_logits = model(_normalise(ood.data.float() / 255))
    for name in ("msp", "mutual_information"):
        expected = ood_detection_metrics(acc.scores()[name], uncertainty_scores(ood_logits)[name].double())
        got = report["ood"]["synthetic"][name]
        assert got == pytest.approx({k: float(v) for k, v in expected.items()}, abs=1e-6)
    # shift: the corrupted test set, image positions 0 .. N-1 whatever the batches
    for corruption in ("gaussian_noise", "pixelate"):
        for severity in (2, 5):
            shifted, _ = _direct(model, test.data, test.targets, corruption, severity)
            got = report["shift"][corruption][severity]
            assert got["nll"] == pytest.approx(shifted.compute()["nll"], abs=1e-5)
    cells = [report["shift"][c][s]["ece"] for c in ("gaussian_noise", "pixelate") for s in (2, 5)]
    assert report["shift_mean"]["ece"] == pytest.approx(sum(cells) / 4)
    assert report["shift_by_severity"][5]["ece"] == pytest.approx(
        (report["shift"]["gaussian_noise"][5]["ece"] + report["shift"]["pixelate"][5]["ece"]) / 2
    )
    assert set(report["calibrated"]) == {"clean", "ood", "shift", "shift_by_severity", "shift_mean"}
    assert report["units"] == dict(METRIC_UNITS) and report["rule"] == "prob" and report["num_subnetworks"] == 2
    json.dumps(report)  # JSON-serialisable
    flat = flatten_report(report)
    assert flat["shift/pixelate/5/nll"] == report["shift"]["pixelate"][5]["nll"]
    assert flat["clean/individual_acc/1"] == report["clean"]["individual_acc"][1]
    assert not any("reliability" in k or k.startswith("units") for k in flat)


def test_loaders_tensors_and_batch_sizes_agree(setup):
    model, test, _, _ = setup
    kw = dict(corruptions=["shot_noise"], severities=[3], preprocess=_normalise)
    a = evaluate_uncertainty(model, (test.data, test.targets), batch_size=48, **kw)
    loader = torch.utils.data.DataLoader(test, batch_size=10)  # float images in [0, 1]
    b = evaluate_uncertainty(model, loader, **kw)
    for part in ("clean",):
        assert a[part]["nll"] == pytest.approx(b[part]["nll"], abs=1e-5)
    assert a["shift"]["shot_noise"][3]["nll"] == pytest.approx(b["shift"]["shot_noise"][3]["nll"], abs=1e-5)
    assert "calibrated" not in a and a["temperature"] is None and a["ood"] == {}


def test_given_temperature_single_network_and_mode_restored(setup):
    _, test, _, _ = setup
    net = wide_resnet(10, 1, num_classes=4).train()  # a plain network: (B, K) logits, M = 1
    report = evaluate_uncertainty(net, (test.data, test.targets), temperature=2.0, corruptions=(), rule="logit")
    assert net.training  # restored
    assert report["num_subnetworks"] == 1 and report["temperature"] == 2.0
    assert report["clean"]["disagreement"] == 0.0 and report["calibrated"]["clean"]["temperature"] == 2.0
    assert report["shift"] == {} and report["shift_mean"] == {}
    # the search interval of the fit is the caller's
    labelled = (test.data, test.targets)
    with pytest.warns(RuntimeWarning, match=r"lies on the edge of bounds=\(0\.5, 0\.6\)"):
        fitted = evaluate_uncertainty(net, labelled, val=labelled, temperature_bounds=(0.5, 0.6), corruptions=())
    assert 0.5 <= fitted["temperature"] <= 0.6


def test_errors(setup):
    model, test, _, _ = setup
    data = (test.data, test.targets)
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\] .* preprocess="):
        evaluate_uncertainty(model, (_normalise(test.data.float() / 255), test.targets), corruptions=())
    with pytest.raises(ValueError, match="corruptions must be one of"):
        evaluate_uncertainty(model, data, corruptions=["fog"])
    with pytest.raises(ValueError, match=r"severities must be integers in 1..5, but got 0"):
        evaluate_uncertainty(model, data, severities=[0])
    with pytest.raises(ValueError, match="test: the batches must hold labels"):
        evaluate_uncertainty(model, test.data, corruptions=())
    with pytest.raises(TypeError, match="test must be an iterable of"):
        evaluate_uncertainty(model, 3, corruptions=())
    with pytest.raises(ValueError, match="test: 48 images but 5 labels"):
        evaluate_uncertainty(model, (test.data, test.targets[:5]), corruptions=())
    with pytest.raises(ValueError, match=r"temperature must be in \(0, inf\]"):
        evaluate_uncertainty(model, data, temperature=0.0, corruptions=())
    with pytest.raises(TypeError, match="names of the OOD sets must be strings"):
        evaluate_uncertainty(model, data, ood={1: test.data}, corruptions=())
    with pytest.raises(ValueError, match=r"the model must return logits \(B, M, K\)"):
        evaluate_uncertainty(nn.Identity(), data, corruptions=())


def test_synthetic_ood_has_new_classes():
    train = SyntheticImageDataset(400, num_classes=4, seed=3, noise=0.0)
    ood = synthetic_ood_dataset(train, 400)
    assert (ood.num_classes, ood.image_size, ood.noise) == (4, 32, 0.0) and ood.seed != train.seed
    # class means of the images (noise-free): no OOD class looks like a training class
    def means(ds):
        x = ds.data.double().flatten(1)
        return torch.stack([x[ds.targets == k].mean(0) for k in range(4)])

    a, b = means(train), means(ood)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    cos = (a @ b.T) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1).view(1, -1))
    same = (a @ a.T) / (a.norm(dim=1, keepdim=True) * a.norm(dim=1).view(1, -1))
    assert float(cos.abs().max()) < 0.5 < float(same.diagonal().min())
    with pytest.raises(ValueError, match="seed must differ from the reference's seed 3"):
        synthetic_ood_dataset(train, seed=3)
    with pytest.raises(TypeError, match="reference must be a SyntheticImageDataset"):
        synthetic_ood_dataset(torch.zeros(3))  # type: ignore[arg-type]


def test_load_svhn(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    io_mod = pytest.importorskip("scipy.io")
    import numpy as np

    with pytest.raises(FileNotFoundError, match=r"test_32x32\.mat is missing or corrupted .* download=True"):
        load_svhn(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)  # the file's (H, W, C, N)
    io_mod.savemat(tmp_path / "test_32x32.mat", {"X": images, "y": np.array([[10], [1], [2], [3], [9]])})
    from torchvision.datasets import SVHN

    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)  # not the real file's checksum
    x, y = load_svhn(tmp_path)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [0, 1, 2, 3, 9]  # SVHN's 10 is the digit 0
    assert torch.equal(x[2, 1], torch.from_numpy(images[:, :, 1, 2]))  # (H, W) of image 2, channel 1
    with pytest.raises(ValueError, match="split must be one of 'train', 'test', 'extra'"):
        load_svhn(tmp_path, "val")


def test_plots(setup, tmp_path):
    pytest.importorskip("matplotlib")
    model, test, val, ood = setup
    report = evaluate_uncertainty(
        model, (test.data, test.targets), ood=ood.data, val=(val.data, val.targets), corruptions=["contrast"],
        severities=[1, 3], preprocess=_normalise,
    )  # fmt: skip
    files = plot_uncertainty_report(report, tmp_path / "report", formats=("png", "svg"))
    assert [f.suffix for f in files] == [".png", ".svg"] and all(f.stat().st_size > 1000 for f in files)
    calibrated = report["calibrated"]["clean"]
    files = plot_reliability_diagram(report["clean"], tmp_path / "sub" / "rel", calibrated=calibrated)
    assert files[0].is_file()
    # the reliability dict alone works too; no shift and no OOD: one panel
    plot_reliability_diagram(report["clean"]["reliability"], tmp_path / "rel2")
    plot_uncertainty_report({"clean": report["clean"]}, tmp_path / "one")
    with pytest.raises(ValueError, match=r"expected the metrics of UncertaintyMetrics\.compute"):
        plot_reliability_diagram({"nll": 1.0}, tmp_path / "bad")
    with pytest.raises(ValueError, match="report must be the dict evaluate_uncertainty returned"):
        plot_uncertainty_report({}, tmp_path / "bad")
    with pytest.raises(ValueError, match="formats must be one of"):
        plot_reliability_diagram(report["clean"], tmp_path / "bad", formats=["gif"])
    assert not list(tmp_path.glob("bad*")) and not list(tmp_path.glob(".*tmp"))


_DIST = """
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

def run(rank, world, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from mixshare_layers.evaluation import UncertaintyMetrics
    from mixshare_layers.evaluation._common import all_gather_cat
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(50, 2, 5, generator=g), torch.randint(5, (50,), generator=g)
    shard = slice(0, 30) if rank == 0 else slice(30, 50)  # unequal shards
    acc = UncertaintyMetrics(2, 5)
    acc.update(logits[shard], targets[shard])
    acc.sync()
    out = acc.compute()
    ref = UncertaintyMetrics(2, 5)
    ref.update(logits, targets)
    expected = ref.compute()
    for key in ("count", "nll", "ece", "adaptive_ece", "classwise_ece", "aurc", "entropy"):
        assert abs(out[key] - expected[key]) < 1e-6, (key, out[key], expected[key])
    gathered = all_gather_cat(torch.arange(3 + rank))
    assert gathered.tolist() == [0, 1, 2, 0, 1, 2, 3], gathered
    dist.destroy_process_group()
    if rank == 0:
        open(path, "w").write("ok")

if __name__ == "__main__":
    mp.spawn(run, args=(2, sys.argv[1]), nprocs=2)
"""


@pytest.mark.slow
def test_sync_gathers_every_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "dist.py"
    script.write_text(textwrap.dedent(_DIST))
    done = tmp_path / "done"
    proc = subprocess.run(
        [sys.executable, str(script), str(done), str(port)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert done.read_text() == "ok"
