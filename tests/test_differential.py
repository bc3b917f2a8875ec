"""The fast slice of benchmarks/differential.py: the library against the independent reference (tests/reference).

* lock-step: from the same weights, on the same batches and mixes, both networks end a few SGD steps (float64) with
  the same parameters, for every preset and at several points of the schedules (CutMix ramp, fadeout);
* the same weights give the same evaluation (logits, accuracies, NLL, sharing rates);
* the two mix samplers, batchers and initialisations agree in distribution;
* the harness itself: its statistics and a two-seed run on a tiny task, swaps included.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import reference as ref
import torch
from reference.train import channel_stats

from benchmarks import differential as diff
from mixshare_layers.functional import sample_mix_params
from mixshare_layers.vocabulary import AUGMENT_TARGETS


@pytest.fixture(scope="module")
def tiny():
    return diff.load_task("tiny")


def _cfg(preset, **kw):
    return diff.TrainConfig(preset=preset, **{**diff.RECIPES["tiny"], "batch": 8, **kw})


@pytest.mark.parametrize("preset", ["mimo", "mixmo", "unmix", "unmix-aligned", "mixshare", "mixshare-partial"])
@pytest.mark.parametrize("offset", [0.0, 0.2, 0.95])
def test_lockstep_float64_same_parameters_after_sgd_steps(tiny, preset, offset):
    """Offsets: the start of training, fadeout at 60 % strength, MixMo's CutMix ramp (p = 0.3)."""
    out = diff.lockstep(_cfg(preset, steps=3), tiny, seed=0, progress_offset=offset)
    # the library computes the fadeout strength in float32 (the progress buffer): 1e-10-level differences
    assert out["max_loss_diff"] < 1e-8
    assert out["max_param_diff"] < 1e-8
    assert out["max_buffer_diff"] < 1e-8


def test_lockstep_detects_a_different_method(tiny, monkeypatch):
    """The same harness with the reference told another method (no loss rebalancing) drifts apart: the check bites."""
    cfg = _cfg("mixmo", steps=2)
    cfg_ref = _cfg("mixmo", steps=2, overrides={"root": None})
    orig = diff.reference_loss
    monkeypatch.setattr(diff, "reference_loss", lambda c: orig(cfg_ref))
    out = diff.lockstep(cfg, tiny, seed=0, progress_offset=0.0)
    assert out["max_loss_diff"] > 1e-6 or out["max_param_diff"] > 1e-6


@pytest.mark.parametrize("preset", ["mixmo", "mixshare"])
def test_same_weights_same_evaluation(tiny, preset):
    cfg = _cfg(preset)
    lib = diff.library_model(cfg, tiny["num_classes"], seed=3, dtype=torch.float64)
    other = diff.reference_model(cfg, tiny["num_classes"], seed=4, dtype=torch.float64)
    diff.copy_weights(lib, other)
    with torch.no_grad():  # give the BatchNorm layers non-trivial statistics first
        for mod in (*lib.core.modules(), *other.core.modules()):
            if isinstance(mod, torch.nn.BatchNorm2d):
                g = torch.Generator().manual_seed(mod.num_features)
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g, dtype=torch.float64) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g, dtype=torch.float64) + 0.5)
    lib.eval()
    other.eval()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(lib(x), other.forward_eval(x), rtol=1e-10, atol=1e-10)
    mine = diff.evaluate_library(lib, tiny)
    mean, std = channel_stats(tiny["train_x"])
    theirs = ref.evaluate(other, tiny["test_x"], tiny["test_y"], mean, std)
    for key in ("ensemble_acc", "mean_individual_acc"):
        assert mine[key] == pytest.approx(theirs[key], abs=1e-9), key
    for key in ("classifier_sharing", "encoder_sharing"):  # the library sums the influences in float32
        assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key
    assert mine["individual_acc"] == pytest.approx(theirs["individual_acc"], abs=1e-6)
    # normalisation: the library example uses the population std, the reference the sample std (n - 1)
    assert mine["nll"] == pytest.approx(theirs["nll"], rel=1e-4)


def test_mix_to_info_renders_the_reference_masks():
    rng = np.random.default_rng(0)
    for cut in (0.0, 1.0):
        for m in (2, 3):
            mix = ref.draw_mix(rng, 16, m, 32, 32, 2.0, cut)
            info = diff.mix_to_info(mix, torch.float64)
            assert torch.allclose(info.masks_at(), mix.masks)
            assert torch.allclose(info.masks_at(8, 8), mix.masks.view(16, m, 8, 4, 8, 4).mean(dim=(3, 5)))


def test_samplers_agree_in_distribution():
    """Library sampler vs reference sampler, 32x32, Beta(2, 2): CutMix share, box owner, owner's realised area."""
    n_batches, b = 300, 64
    rng = np.random.default_rng(1)
    g = torch.Generator().manual_seed(1)
    ref_area, lib_area, ref_cut, lib_cut, lib_owner_first = [], [], 0, 0, 0
    for _ in range(n_batches):
        mix = ref.draw_mix(rng, b, 2, 32, 32, 2.0, 0.5)
        info = sample_mix_params(b, 2, 32, 32, alpha=2.0, cutmix_prob=0.5, generator=g, dtype=torch.float64)
        ref_cut += mix.cutmix
        lib_cut += bool(info.cutmix)
        if mix.cutmix:
            ref_area.append(mix.ratios[:, mix.owner])
        if bool(info.cutmix):
            owner = int(info.inside[0].argmax())
            assert torch.equal(info.inside.argmax(dim=1), torch.full((b,), owner))  # one owner per batch
            lib_owner_first += owner == 0
            lib_area.append(info.ratios[:, owner])
    for cut in (ref_cut, lib_cut):
        assert abs(cut - n_batches / 2) < 4 * math.sqrt(n_batches / 4)
    assert abs(lib_owner_first - lib_cut / 2) < 4 * math.sqrt(lib_cut / 4)
    a, c = torch.cat(ref_area), torch.cat(lib_area)
    se = math.sqrt(a.var() / a.numel() + c.var() / c.numel())
    assert abs(float(a.mean() - c.mean())) < 4 * se
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    assert torch.allclose(a.quantile(qs), c.quantile(qs), atol=0.03)


@pytest.mark.parametrize("preset", ["mixmo", "mixshare"])
def test_initialisations_agree_in_distribution(preset):
    """Every weight tensor of the library's network has the reference's spread, over seeds (the statistical slice
    that found the library's heads starting 2.45 times smaller, with random biases)."""
    cfg = _cfg(preset, depth=10, width=2)
    stats: dict[str, list[tuple[float, float]]] = {}
    for seed in range(6):
        lib = diff.library_model(cfg, 40, seed)
        mine = diff.reference_model(cfg, 40, seed)  # a copy of the library's weights in the reference's layout
        other = diff.reference_model(cfg, 40, seed + 100)
        diff.copy_weights(lib, mine)
        with torch.no_grad():
            for (name, a), (_, b) in zip(mine.named_parameters(), other.named_parameters(), strict=True):
                stats.setdefault(name, []).append((float(a.std()) if a.numel() > 1 else float(a.abs().sum()),
                                                   float(b.std()) if b.numel() > 1 else float(b.abs().sum())))
    for name, values in stats.items():
        lib_s, ref_s = torch.tensor(values, dtype=torch.float64).unbind(1)
        if name.endswith("bias") or "bn" in name or name.startswith("core.3"):
            assert torch.equal(lib_s, ref_s), name  # constants: zero biases, BatchNorm 1 / 0
            continue
        assert abs(float(lib_s.mean() / ref_s.mean()) - 1) < 0.05, (name, lib_s.mean(), ref_s.mean())
    if preset == "mixshare":  # aligned encoders in both
        assert stats["encoders.0.weight"] == stats["encoders.1.weight"]


def test_mean_se_and_compare():
    mean, se, n = diff.mean_se([1.0, 2.0, 3.0, 4.0])
    assert (mean, n) == (2.5, 4) and se == pytest.approx(math.sqrt(5 / 3 / 4))
    assert math.isnan(diff.mean_se([1.0])[1]) and diff.mean_se([])[2] == 0
    same = diff.compare([1.0, 2.0, 3.0], [1.5, 2.5, 2.0])
    far = diff.compare([10.0, 10.5, 11.0], [1.0, 1.5, 2.0])
    assert not same["flag"] and far["flag"] and far["diff"] == pytest.approx(9.0)


def test_init_table_compares_two_initialisations_per_implementation_paired_by_seed(tmp_path, capsys):
    def run(impl, init, seed, acc, **extra):
        metrics = {key: acc for key, _ in diff.METRICS}
        base = dict(impl=impl, method="mixmo", seed=seed, swaps=[], task="tiny", recipe="tiny", label="current",
                    init=init, individual_acc=[acc, acc], collapsed=[])  # fmt: skip
        return {**base, **metrics, **extra}

    results = [run("library", "torch", s, 90.0 + 3 * s) for s in range(3)]  # seeds spread far apart
    results += [run("library", "mixmo", s, 88.0 + 3.1 * s + 0.1 * s * s) for s in range(3)]  # paired: 2, 1.8, 1.4
    results += [run("reference", "torch", s, 80.0) for s in range(2)]  # no mixmo runs: no reference rows
    results += [run("library", "mixmo", 3, 10.0, swaps=["init"])]  # a swapped run belongs to another group
    text = diff.init_table(results, ["mixmo"], "torch", "mixmo")
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `mixmo`")]
    assert {r[1] for r in rows} == {"library"}
    acc = next(r for r in rows if r[2] == "ensemble acc. (%)")
    paired = diff.mean_se([2.0, 1.8, 1.4])
    assert acc[3] == "93.0 ± 1.7" and acc[4] == f"{diff.mean_se([88.0, 91.2, 94.6])[0]:.1f} ± 1.9"
    assert acc[6] == f"+{paired[0]:.1f} ± {paired[1]:.1f} **" and not acc[5].endswith("**")  # only pairing sees it
    assert acc[7] == "3 / 3 |"
    (tmp_path / "results.json").write_text(json.dumps(results))
    diff.main(["--table-only", "--task", "tiny", "--recipe", "tiny", "--methods", "mixmo", "--out", str(tmp_path),
               "--compare-init", "torch", "mixmo"])  # fmt: skip
    assert "| method | implementation | metric | init `torch` | init `mixmo` |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        diff.main(["--table-only", "--out", str(tmp_path), "--compare-init", "torch", "he"])
    assert "invalid choice: 'he'" in capsys.readouterr().err


def test_harness_two_seeds_both_implementations_with_swaps(tmp_path, capsys):
    out = tmp_path / "d"
    args = ["--task", "tiny", "--recipe", "tiny", "--methods", "mixmo", "--seeds", "0", "1", "--jobs", "1"]
    results = diff.main([*args, "--out", str(out)])
    assert len(results) == 4 and {r["impl"] for r in results} == {"library", "reference"}
    text = capsys.readouterr().out
    assert "| `mixmo` | ensemble acc. (%) |" in text and "two standard errors" in text
    results = diff.main([*args, "--out", str(out), "--swap", "init", "mix"])
    swapped = [r for r in results if r["swaps"] == ["init", "mix"]]
    assert len(swapped) == 4
    assert all(0 <= r["ensemble_acc"] <= 100 and len(r["individual_acc"]) == 2 for r in swapped)
    saved = json.loads((out / "results.json").read_text())
    assert len(saved) == 8
    capsys.readouterr()
    diff.main([*args, "--out", str(out)])  # everything cached: nothing trained again
    assert "runs to do" not in capsys.readouterr().out


def test_swap_augment_trains_the_library_with_per_input_augmentation(tiny, tmp_path, capsys):
    cfg = _cfg("mixshare")
    data = {**tiny, "train_x": tiny["train_x"][:64]}
    rows = {a: diff.library_batcher(cfg, data, 0, torch.float32, augment=a)(np.arange(16)) for a in AUGMENT_TARGETS}
    for augment, (xs, ys) in rows.items():
        assert xs.shape == (32, 2, 3, 32, 32) and ys.shape == (32, 2)
        # "copies" gives the round(0.1 * 32) = 3 input-repetition rows one crop in both members, "inputs" crops each
        # member's input on its own (two crops agree with probability 1 / 162)
        same = int((xs[:, 0] == xs[:, 1]).flatten(1).all(1).sum())
        assert same >= 3 if augment == "copies" else same < 3, (augment, same)
    args = ["--task", "tiny", "--recipe", "tiny", "--methods", "mixmo", "--seeds", "0", "--jobs", "1"]
    results = diff.main([*args, "--impl", "library", "--swap", "augment", "--out", str(tmp_path / "d")])
    assert [(r["impl"], r["swaps"]) for r in results] == [("library", ["augment"])]
    capsys.readouterr()
    diff.main([*args, "--impl", "library", "--out", str(tmp_path / "d")])
    assert "| method | metric |" not in capsys.readouterr().out  # no swap: nothing to compare the library with
    diff.main([*args, "--impl", "library", "--swap", "augment", "--table-only", "--out", str(tmp_path / "d")])
    text = capsys.readouterr().out
    assert "| method | metric | library + augment from ref. | library | difference | n |" in text
    assert "| `mixmo` | ensemble acc. (%) |" in text
    assert "library + augment from ref." in diff._label("library", ("augment",))
    for bad in (["--swap", "augment"], ["--impl", "library", "--swap", "batch", "augment"]):
        with pytest.raises(SystemExit):
            diff.main([*args, *bad, "--out", str(tmp_path / "e")])
    assert "--swap augment changes the library's batcher only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="swaps may not hold 'augment' for the reference"):
        diff.train_reference(cfg, tiny, 0, ("augment",))
