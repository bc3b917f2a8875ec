"""benchmarks/reinit_backbones.py: its two arms differ only in the layers the wrapper draws, it trains both
backbones (resnet18 here, the ViT example as a child process), skips finished runs and tabulates backbone - torch."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import reinit_backbones as rb
from benchmarks.differential import TrainConfig


@pytest.mark.parametrize("preset", ["mixmo", "mixshare"])
def test_resnet18_arms_differ_only_in_the_drawn_layers(preset):
    """torchvision's ResNet draws convolutions Kaiming-normal (fan-out): independent encoder copies get std
    sqrt(2 / (64 * 9)) against PyTorch's 1 / sqrt(3 * 27); aligned ones are the backbone's conv1 in both arms. The
    heads are nn.Linear's default in both, and the core is the same."""
    built = {arm: rb.resnet_wrapper(preset, arm, 40, seed=0) for arm in rb.REINITS}
    kernels = {arm: w.encoder.kernels().detach() for arm, w in built.items()}
    if preset == "mixmo":
        assert float(kernels["backbone"].std()) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
        assert float(kernels["torch"].std()) == pytest.approx(1 / math.sqrt(3 * 27), rel=0.05)
    else:
        assert torch.equal(kernels["backbone"], kernels["torch"])
    for w in built.values():
        heads = w.heads.weight.detach()
        assert float(heads.abs().max()) <= 1 / math.sqrt(512)
        assert float(heads.std()) == pytest.approx(1 / math.sqrt(3 * 512), rel=0.05)
    cores = [list(w.core.parameters()) for w in built.values()]
    assert all(torch.equal(a, b) for a, b in zip(*cores, strict=True))


def test_table_gives_the_differences_and_flags_them():
    runs = [dict(backbone="vit", preset="mixmo", steps=5, reinit=arm, seed=s, ensemble_acc=acc, nll=nll,
                 mean_individual_acc=acc - 5)
            for arm, accs, nll in (("backbone", (90.0, 92.0, 94.0), 0.3), ("torch", (80.0, 81.0, 82.0), 0.3))
            for s, acc in enumerate(accs)]  # fmt: skip
    rows = {line.split(" | ")[3]: line.split(" | ") for line in rb.table(runs).splitlines() if line.startswith("| vit")}
    se = math.sqrt((2 / math.sqrt(3)) ** 2 + (1 / math.sqrt(3)) ** 2)
    paired = f"+11.0 ± {1 / math.sqrt(3):.1f} **"  # per-seed differences 10, 11, 12
    assert rows["ensemble acc. (%)"][4:9] == ["92.0 ± 1.2", "81.0 ± 0.6", f"+11.0 ± {se:.1f} **", paired, "3 / 3 |"]
    assert rows["ensemble NLL"][6:8] == ["+0.000 ± 0.000"] * 2  # no difference, not flagged
    assert "NLL, calibrated" not in rows and "ensemble ECE" not in rows  # no run has them: no row


def test_table_gives_calibrated_rows_only_where_every_run_has_them():
    def run(arm, seed, calibrated_nll):
        return dict(backbone="vit", preset="mixmo", steps=5, reinit=arm, seed=seed, ensemble_acc=90.0, nll=0.5,
                    mean_individual_acc=85.0, ece=0.2, calibrated_nll=calibrated_nll, calibrated_ece=0.01,
                    temperature=0.5)  # fmt: skip

    runs = [run("backbone", 0, 0.40), run("backbone", 1, 0.42), run("torch", 0, 0.30), run("torch", 1, 0.34)]
    rows = {line.split(" | ")[3]: line.split(" | ") for line in rb.table(runs).splitlines() if line.startswith("| vit")}
    assert rows["NLL, calibrated"][4:6] == ["0.410 ± 0.010", "0.320 ± 0.020"]
    assert rows["NLL, calibrated"][7] == "+0.090 ± 0.010 **"  # paired: differences 0.10 and 0.08
    assert {"ensemble ECE", "ECE, calibrated", "temperature"} <= set(rows)
    runs[3]["calibrated_nll"] = None  # one run without --val: the group's calibrated NLL is not tabulated
    assert "NLL, calibrated" not in rb.table(runs)


def test_sweep_trains_both_backbones_and_skips_finished_runs(tmp_path, capsys, monkeypatch):
    argv = ["--presets", "mixshare", "--seeds", "1", "--resnet-steps", "1", "--task", "tiny", "--recipe", "tiny",
            "--resnet-lr", "0.01", "--vit-steps", "1", "--out", str(tmp_path), "--", "--smoke"]  # fmt: skip
    configs = []
    monkeypatch.setattr(rb, "TrainConfig", lambda **kw: configs.append(kw) or TrainConfig(**kw))
    results = rb.main(argv)
    assert [(c["lr"], c["steps"]) for c in configs] == [(0.01, 1)] * 2  # --resnet-lr reaches both resnet18 runs
    assert sorted((r["backbone"], r["reinit"], r["seed"]) for r in results) == sorted(
        (b, arm, 1) for b in rb.BACKBONES for arm in rb.REINITS
    )
    assert json.loads((tmp_path / "results.json").read_text()) == results
    for r in results:
        assert 0 <= r["ensemble_acc"] <= 100 and len(r["individual_acc"]) == 2 and math.isfinite(r["nll"])
    for r in results:
        if r["backbone"] == "vit":  # the raw ECE is kept; without --val there is no temperature
            assert 0 <= r["ece"] <= 1 and r["calibrated_nll"] is None and r["temperature"] is None
    summary = json.loads((tmp_path / "vit" / "vit-mixshare-torch-steps1-s1.json").read_text())
    assert summary["config"]["reinit"] == "torch" and summary["steps"] == 1 and summary["config"]["seed"] == 1
    out = capsys.readouterr().out
    for backbone, setting in (("resnet18", "1, tiny, lr 0.01"), ("vit", "1")):  # the difference, as printed
        row = next(line for line in out.splitlines() if line.startswith(f"| {backbone} | `mixshare` | {setting} | ens"))
        acc = {r["reinit"]: r["ensemble_acc"] for r in results if r["backbone"] == backbone}
        assert row.split(" | ")[6:9] == [f"{acc['backbone'] - acc['torch']:+.1f}"] * 2 + ["1 / 1 |"]
    again = rb.main(argv)
    assert again == results and "runs to do" not in capsys.readouterr().out  # nothing trained again


def test_steps_and_lr_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        rb.main(["--resnet-steps", "0", "--table-only"])
    assert "--resnet-steps must be at least 1, got 0" in capsys.readouterr().err
    for bad in ("0", "-0.1", "nan"):
        with pytest.raises(SystemExit):
            rb.main(["--resnet-lr", bad, "--table-only"])
        assert f"--resnet-lr must be a positive number, got {float(bad)}" in capsys.readouterr().err
