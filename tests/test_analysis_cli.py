"""``python -m mixshare_layers.analysis CHECKPOINT --out DIR`` on tiny checkpoints, and its one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_cases import CASES, code_running_checkpoint, make_case

from mixshare_layers import MIMOWrapper
from mixshare_layers.analysis import classifier_influence, load_wrn_checkpoint, model_from_checkpoint, sharing_rate
from mixshare_layers.analysis.__main__ import cli, main
from mixshare_layers.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    convert_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from mixshare_layers.data import SyntheticImageDataset
from mixshare_layers.functional import ensemble_log_probs
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
    save_checkpoint(path, {"model": model.state_dict(), "config": dict(CONFIG, dataset="synthetic"), "epoch": 3})
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
    assert result["evaluation"] is None
    result = main([str(path), "--out", str(out), "--no-plots", "--variance-images", "4", "--eval-images", "0"])
    assert result["evaluation"] is None and "variance:core.0" in result["rates"]


# the evaluation's test images: the checkpoint's synthetic test split with a normalisation it records
EVAL_CONFIG = dict(CONFIG, dataset="synthetic", synthetic_size=16, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def _evaluation_reference(model: MIMOWrapper, n: int, rule: str, temperature: float) -> dict[str, float]:
    """Accuracy and NLL of the model on the first ``n`` synthetic test images, in float64 from its logits."""
    test = SyntheticImageDataset(n, 10, 16, train=False, seed=0)
    x = (test.data.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        ens = ensemble_log_probs(model.eval()(x).double(), rule)
    tempered = torch.log_softmax(ens / temperature, dim=-1)
    nll = float(-tempered.gather(1, test.targets.view(-1, 1)).mean())
    return {"ensemble_acc": float((ens.argmax(1) == test.targets).double().mean()), "nll": nll}


@pytest.mark.parametrize("rule", ["prob", "logit"])
def test_cli_evaluates_raw_and_at_the_checkpoints_stored_temperature(tmp_path, rule, capsys):
    torch.manual_seed(0)
    model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixshare")
    with torch.no_grad():
        model.heads.weight.mul_(30.0)  # logits that spread, so that the temperature matters
        model.temperature.copy_(torch.tensor([0.5, 2.0]))  # as MIMOWrapper.calibrate stores them
    path = tmp_path / "calibrated.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": EVAL_CONFIG})
    argv = [str(path), "--out", str(tmp_path / "out"), "--no-plots", "--variance-images", "0"]
    result = main([*argv, "--eval-images", "48", "--rule", rule])
    printed = capsys.readouterr().out
    evaluation = result["evaluation"]
    t = 0.5 if rule == "prob" else 2.0
    assert evaluation["temperature"] == t and evaluation["temperature_source"] == "checkpoint"
    assert (evaluation["data"], evaluation["images"], evaluation["rule"]) == ("synthetic", 48, rule)
    raw, calibrated = _evaluation_reference(model, 48, rule, 1.0), _evaluation_reference(model, 48, rule, t)
    for key in ("ensemble_acc", "nll"):
        assert evaluation["raw"][key] == pytest.approx(raw[key], rel=1e-5, abs=1e-6), key
        assert evaluation["calibrated"][key] == pytest.approx(calibrated[key], rel=1e-5, abs=1e-6), key
    assert abs(evaluation["calibrated"]["nll"] - evaluation["raw"]["nll"]) > 1e-2  # the temperature was applied
    assert evaluation["calibrated"]["ece"] != evaluation["raw"]["ece"]
    assert json.loads((tmp_path / "out" / "sharing.json").read_text())["evaluation"] == evaluation
    assert f"calibrated with the checkpoint's stored temperature {t:.4g}: accuracy" in printed
    assert f"evaluation on 48 synthetic test images (rule {rule!r}): raw accuracy" in printed


def test_cli_evaluates_a_model_without_a_fitted_temperature_raw_only(tmp_path, capsys):
    torch.manual_seed(0)
    model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixshare")
    path = tmp_path / "plain.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": EVAL_CONFIG})
    result = main([str(path), "--out", str(tmp_path / "out"), "--no-plots", "--variance-images", "0"])
    evaluation = result["evaluation"]
    assert evaluation["images"] == 512  # the default
    assert evaluation["calibrated"] is None and evaluation["temperature"] is None
    assert evaluation["temperature_source"] is None
    raw = _evaluation_reference(model, 512, "prob", 1.0)
    assert evaluation["raw"]["nll"] == pytest.approx(raw["nll"], rel=1e-5)
    assert evaluation["raw"]["ensemble_acc"] == pytest.approx(raw["ensemble_acc"])
    assert "the checkpoint holds no fitted temperature: raw only" in capsys.readouterr().out


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
    torch.save({"model_state": state, "args": args}, path)  # another program's checkpoint: a pickled Namespace
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace.*mixshare_layers\.checkpoint convert"):
        load_wrn_checkpoint(path)  # refused: loading it would mean unpickling an object
    loaded, config = load_wrn_checkpoint(convert_checkpoint(path, tmp_path / "converted.pt"))  # once, no code runs
    assert loaded.num_subnetworks == 3 and loaded.config.unmix_mode == "full" and not loaded.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert config["method"] == "mixmo"


def test_checkpoint_errors(tmp_path):
    model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixshare")
    keys = len(model.state_dict())
    refusal = rf"state_dict under 'model' and a 'recipe' .* its settings under 'config' .*\.\.\. \({keys} keys\)\]"
    with pytest.raises(ValueError, match=refusal):
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
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_wrn_checkpoint(tmp_path / "missing.pt")
    assert isinstance(info.value, CheckpointNotFoundError)
    save_checkpoint(tmp_path / "wide.pt", {"model": model.state_dict(), "config": dict(CONFIG, width=2)})
    with pytest.raises(CheckpointError, match=r"wide\.pt: does not rebuild a wrapped WRN: .*size mismatch"):
        load_wrn_checkpoint(tmp_path / "wide.pt")


def test_cli_on_a_checkpoint_of_the_example_script(tmp_path):
    """examples/cifar100_wrn.py --smoke writes checkpoint.pt with its recipe: load_model and the CLI rebuild it."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "examples" / "cifar100_wrn.py").is_file():
        pytest.skip("examples/cifar100_wrn.py is not in this checkout")
    argv = ["--smoke", "--device", "cpu", "--method", "mixshare-partial", "--seed", "1"]
    argv += ["--out-dir", str(tmp_path), "--run-name", "run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "examples/cifar100_wrn.py", *argv], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    result = main(
        [str(run_dir / "checkpoint.pt"), "--out", str(tmp_path / "an"), "--no-plots", "--variance-images", "8"]
    )
    assert result["method"] == "mixshare-partial" and result["num_subnetworks"] == 2
    assert result["rates"]["classifier"]["mean_ratio"] == pytest.approx(summary["classifier_sharing_pct"], abs=1e-6)
    assert result["rates"]["encoder"]["mean_ratio"] == pytest.approx(summary["encoder_sharing_pct"], abs=1e-6)
    assert "variance:core.2" in result["rates"]
    assert result["config"]["builder"] == "mixshare_layers.models.wide_resnet"
    loaded, checkpoint = load_model(run_dir / "checkpoint.pt")  # the recipe alone rebuilds the trained model
    kwargs = {"depth": 10, "width": 1, "num_classes": 10, "init": "torch-he-heads"}
    assert checkpoint["recipe"]["builder_kwargs"] == kwargs
    assert loaded.preset == "mixshare-partial" and checkpoint["epoch"] == summary["epochs"]
    for key, value in load_checkpoint(run_dir / "checkpoint.pt")["model"].items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_checkpoint_with_the_older_5d_encoder_layout_loads():
    model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixmo")
    state = model.state_dict()
    state["encoder.weight"] = model.encoder.kernels().detach().clone()  # (M, C', C, k, k), as saved before
    loaded, _ = model_from_checkpoint({"model": state, "config": dict(CONFIG, method="mixmo")})
    torch.testing.assert_close(loaded.encoder.kernels(), model.encoder.kernels())


# ---------------------------------------------------------------------------------------------------------------
# errors: one line on stderr, exit code 2, no output folder
# ---------------------------------------------------------------------------------------------------------------
def _run_cli(argv, capsys):
    capsys.readouterr()
    try:
        code = cli(argv)
    except SystemExit as exc:  # argparse and option errors
        code = exc.code
    return code, capsys.readouterr().err


def _one_line_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_one_line_exit_2(checkpoint, tmp_path, case, capsys):
    good, _ = checkpoint
    bad = tmp_path / f"{case}.pt"
    make_case(case, good, bad, tmp_path / "marker")
    out = tmp_path / "out"
    code, err = _run_cli([str(bad), "--out", str(out), "--no-plots", "--data", "none"], capsys)
    line = _one_line_error(code, err, str(bad))
    assert re.search(CASES[case], line), line
    assert not out.exists() and not (tmp_path / "marker").exists()


def _unwritable_folder(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder / "out"
    if sys.platform.startswith("linux") and Path("/proc").is_dir():
        return Path("/proc/mixshare-test-out")
    pytest.skip("no folder is read-only for root here")


BAD_OPTIONS = [
    (["--variance-images", "-1"], "--variance-images"),
    (["--variance-images", "x"], "--variance-images"),
    (["--eval-images", "-1"], "--eval-images"),
    (["--rule", "vote"], "--rule"),
    (["--device", "bogus"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--layers"], "--layers"),
    (["--layers", "core.9"], "--layers"),
    (["--data", "bogus"], "--data"),
    (["--data", "cifar100", "--data-root", "{tmp}/no-data"], "--data-root"),
    (["--sort", "bogus"], "--sort"),
    (["--formats", "gif"], "--formats"),
    (["--out", "{tmp}/a-file"], "--out"),
    (["--out", "{tmp}/a-file/out"], "--out"),
    (["--out", "{unwritable}"], "--out"),
    (["--checkpoint-missing"], "does not exist"),
    (["--no-out"], "--out"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_one_line_exit_2(checkpoint, tmp_path, capsys, argv, needle):
    path, _ = checkpoint
    (tmp_path / "a-file").write_text("not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    if argv == ["--checkpoint-missing"]:
        path, argv = tmp_path / "missing.pt", []
    out = [] if "--out" in argv or argv == ["--no-out"] else ["--out", str(tmp_path / "out")]
    argv = [] if argv == ["--no-out"] else argv
    subs = {"{tmp}": str(tmp_path), "{unwritable}": ""}
    if "{unwritable}" in argv:
        subs["{unwritable}"] = str(_unwritable_folder(tmp_path))
    argv = [subs["{unwritable}"] if a == "{unwritable}" else a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = _run_cli([str(path), *out, "--no-plots", "--variance-images", "4", *argv], capsys)
    _one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_code_running_checkpoint_never_runs(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "marker"
    evil = code_running_checkpoint(tmp_path / "evil.pt", marker, config=CONFIG)
    for env in (None, "1"):
        if env is not None:
            monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", env)
        code, err = _run_cli([str(evil), "--out", str(tmp_path / "out"), "--no-plots"], capsys)
        _one_line_error(code, err, str(evil), "refused", "builtins.exec")
        with pytest.raises(CheckpointError, match="refused"):
            load_wrn_checkpoint(evil)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_checkpoint_of_an_older_script_version_is_refused_in_one_line(tmp_path):
    """examples/cifar100_wrn.py's checkpoints from before they held their config (format tag 1, settings only in
    config.json) are refused, with what to do; a converted one still lacks the settings, and says so."""
    model = MIMOWrapper(wide_resnet(10, 1, 10), 2, preset="mixshare", fadeout_end=0.5)
    torch.save({"format": 1, "model": model.state_dict(), "epoch": 1}, tmp_path / "checkpoint.pt")  # no digest
    (tmp_path / "config.json").write_text(json.dumps(dict(CONFIG, fadeout_end=0.5, dataset="synthetic")))
    with pytest.raises(CheckpointError, match=r"has the format tag 1, not 'mixshare_layers\.checkpoint'.*convert"):
        load_wrn_checkpoint(tmp_path / "checkpoint.pt")
    converted = convert_checkpoint(tmp_path / "checkpoint.pt", tmp_path / "converted.pt")
    with pytest.raises(CheckpointError, match=r"records no recipe .* and no config; save it with .*save_model"):
        load_wrn_checkpoint(converted)
