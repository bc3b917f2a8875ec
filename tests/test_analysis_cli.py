"""``python -m mixshare_layers.analysis CHECKPOINT --out DIR`` on tiny checkpoints."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixshare_layers import MIMOWrapper
from mixshare_layers.analysis import classifier_influence, load_wrn_checkpoint, model_from_checkpoint, sharing_rate
from mixshare_layers.analysis.__main__ import main
from mixshare_layers.models import wide_resnet

CONFIG = {"depth": 10, "width": 1, "num_classes": 10, "method": "mixshare", "num_subnetworks": 2}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixshare")
    with torch.no_grad():
        model.heads.weight[1].mul_(torch.rand_like(model.heads.weight[1]))  # some difference between the heads
    model.set_progress(0.5)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": dict(CONFIG, dataset="synthetic"), "epoch": 3}, path)
    return path, model


def test_cli_writes_rates_and_figures(checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    path, model = checkpoint
    out = tmp_path / "analysis"
    result = main([str(path), "--out", str(out), "--variance-images", "12"])
    saved = json.loads((out / "sharing.json").read_text())
    assert saved == json.loads(json.dumps(result))
    expected = float(sharing_rate(classifier_influence(model)))
    assert saved["rates"]["classifier"]["mean_ratio"] == pytest.approx(expected)
    assert saved["rates"]["encoder"]["mean_ratio"] == pytest.approx(100.0)  # aligned encoders, untrained
    assert set(saved["rates"]) == {"encoder", "classifier", "variance:core.0", "variance:core.1", "variance:core.2"}
    assert len(saved["influence"]["classifier"]) == 2 and len(saved["influence"]["classifier"][0]) == 64
    names = {p.name for p in out.iterdir()}
    for stem in ("encoder_influence", "classifier_influence", "variance_core_0", "variance_core_2"):
        for ext in ("png", "svg"):
            assert f"{stem}.{ext}" in names and (out / f"{stem}.{ext}").stat().st_size > 0
    assert not [n for n in names if n.endswith(".tmp")]


def test_cli_without_plots_or_variance(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "json-only"
    result = main([str(path), "--out", str(out), "--no-plots", "--data", "none"])
    assert sorted(p.name for p in out.iterdir()) == ["sharing.json"]
    assert set(result["rates"]) == {"encoder", "classifier"} and result["figures"] == []


def test_cli_runs_as_a_module(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "module"
    cmd = [
        sys.executable,
        "-m",
        "mixshare_layers.analysis",
        str(path),
        "--out",
        str(out),
        "--no-plots",
        "--data",
        "none",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "classifier: sharing" in proc.stdout and (out / "sharing.json").is_file()


def test_checkpoint_variants_load(tmp_path):
    model = MIMOWrapper(wide_resnet(10, 1, 10), 3, preset="mixmo", unmix_mode="full")
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # as saved from a torch.compile'd model
    args = argparse.Namespace(**dict(CONFIG, method="mixmo", num_subnetworks=3, overrides={"unmix_mode": "full"}))
    path = tmp_path / "ck.pt"
    torch.save({"model_state": state, "args": args}, path)
    loaded, config = load_wrn_checkpoint(path)
    assert loaded.num_subnetworks == 3 and loaded.config.unmix_mode == "full" and not loaded.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert config["method"] == "mixmo"


def test_checkpoint_errors(tmp_path):
    model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixshare")
    with pytest.raises(ValueError, match="state_dict under 'model' and the settings to rebuild it under 'config'"):
        model_from_checkpoint(model.state_dict())
    no_depth = {k: v for k, v in CONFIG.items() if k != "depth"}
    with pytest.raises(ValueError, match=r"config lacks \['depth'\]"):
        model_from_checkpoint({"model": model.state_dict(), "config": no_depth})
    with pytest.raises(RuntimeError, match="size mismatch"):
        model_from_checkpoint({"model": model.state_dict(), "config": dict(CONFIG, num_classes=7)})
    plain = wide_resnet(10, 1, 10)
    with pytest.raises(ValueError, match="holds a plain network"):
        model_from_checkpoint({"model": plain.state_dict(), "config": dict(CONFIG, method="single")})
    with pytest.raises(TypeError, match="checkpoint must be a dict, but got list"):
        model_from_checkpoint([1])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_wrn_checkpoint(tmp_path / "missing.pt")


def test_cli_on_a_checkpoint_of_the_example_script(tmp_path):
    """examples/cifar100_wrn.py --smoke writes checkpoint.pt (weights only) + config.json: the CLI reads both."""
    script = Path(__file__).resolve().parents[1] / "examples" / "cifar100_wrn.py"
    if not script.is_file():
        pytest.skip("examples/cifar100_wrn.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("_cifar100_wrn_for_analysis_test", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    argv = ["--smoke", "--device", "cpu", "--method", "mixshare-partial", "--seed", "1"]
    argv += ["--out-dir", str(tmp_path), "--run-name", "run"]
    summary = module.main(argv)
    run_dir = Path(summary["run_dir"])
    result = main(
        [str(run_dir / "checkpoint.pt"), "--out", str(tmp_path / "an"), "--no-plots", "--variance-images", "8"]
    )
    assert result["method"] == "mixshare-partial" and result["num_subnetworks"] == 2
    assert result["rates"]["classifier"]["mean_ratio"] == pytest.approx(summary["classifier_sharing"], abs=1e-6)
    assert result["rates"]["encoder"]["mean_ratio"] == pytest.approx(summary["encoder_sharing"], abs=1e-6)
    assert "variance:core.2" in result["rates"]


def test_checkpoint_with_the_older_5d_encoder_layout_loads():
    model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixmo")
    state = model.state_dict()
    state["encoder.weight"] = model.encoder.kernels().detach().clone()  # (M, C', C, k, k), as saved before
    loaded, _ = model_from_checkpoint({"model": state, "config": dict(CONFIG, method="mixmo")})
    torch.testing.assert_close(loaded.encoder.kernels(), model.encoder.kernels())
