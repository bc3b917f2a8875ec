"""benchmarks/train_probe.py: the numbers it prints are those of the training it runs."""

from __future__ import annotations

import math

import pytest

from benchmarks import train_probe


@pytest.mark.parametrize("backbone", train_probe.BACKBONES)
def test_probe_starts_at_chance_for_plain_and_wrapped(backbone):
    """At the first step the heads' logits are small, so the loss is near chance: ln K for the plain network,
    M ln K (the members' losses summed) for the wrapper."""
    runs = {preset: train_probe.probe(backbone, preset, task="tiny", recipe="tiny", steps=3, every=2)
            for preset in (None, "mixmo")}  # fmt: skip
    chance = math.log(10)
    for preset, records in runs.items():
        assert [r["step"] for r in records] == [0, 2]
        first = records[0]
        members = 1 if preset is None else 2
        assert first["loss"] == pytest.approx(members * chance, rel=0.25), (preset, first)
        assert 0 < first["feature_positive"] <= 1 and first["grad_norm"] > 0 and first["max_logit"] > 0
    lr_changed = train_probe.probe(backbone, None, task="tiny", recipe="tiny", steps=3, every=2, lr=0.5)
    assert lr_changed[0]["loss"] == runs[None][0]["loss"]  # same start, and the lr shows after one step
    assert lr_changed[1]["loss"] != runs[None][1]["loss"]


def test_cli_prints_a_line_per_record_and_rejects_bad_values(capsys):
    records = train_probe.main(["--backbone", "wrn", "--plain", "--task", "tiny", "--recipe", "tiny", "--steps", "2",
                                "--every", "1"])  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == len(records) == 2 and f"loss {records[1]['loss']:.3f}" in lines[1]
    for flag, value, message in (("--lr", "-1", "--lr must be a positive number, got -1.0"),
                                 ("--steps", "0", "--steps must be at least 1, got 0")):  # fmt: skip
        with pytest.raises(SystemExit):
            train_probe.main([flag, value])
        assert message in capsys.readouterr().err
