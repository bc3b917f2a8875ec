"""The preset table, overrides and the configuration's error paths."""

from __future__ import annotations

import dataclasses

import pytest

from mixshare_layers import PRESETS, MIMOConfig, get_preset

# The preset table of the README and of mixshare_layers.presets, field by field.
EXPECTED = {
    "mimo": {
        "encoder_init": "independent",
        "alpha": 0.0,
        "cutmix_prob": 0.0,
        "unmix_mode": "none",
        "rebalance_root": None,
        "input_repetition": 0.0,
    },
    "mixmo": {
        "encoder_init": "independent",
        "alpha": 2.0,
        "cutmix_prob": 0.5,
        "cutmix_ramp": 1 / 12,
        "unmix_mode": "none",
        "rebalance_root": 3.0,
        "input_repetition": 0.0,
    },
    "unmix": {
        "encoder_init": "independent",
        "alpha": 2.0,
        "cutmix_prob": 0.5,
        "cutmix_ramp": 1 / 12,
        "unmix_mode": "full",
        "rebalance_root": 3.0,
    },
    "unmix-aligned": {"encoder_init": "aligned", "cutmix_prob": 0.5, "unmix_mode": "full", "rebalance_root": 3.0},
    "mixshare": {
        "encoder_init": "aligned",
        "alpha": 2.0,
        "cutmix_prob": 1.0,
        "cutmix_ramp": 0.0,
        "unmix_mode": "fadeout",
        "fadeout_end": 1 / 3,
        "rebalance_root": 1.0,
        "input_repetition": 0.1,
    },
    "mixshare-partial": {
        "encoder_init": "aligned",
        "cutmix_prob": 1.0,
        "unmix_mode": "partial",
        "unmix_fraction": 0.25,
        "rebalance_root": 1.0,
        "input_repetition": 0.1,
    },
}


def test_the_table():
    assert set(PRESETS) == set(EXPECTED)
    for name, fields in EXPECTED.items():
        config = get_preset(name)
        assert isinstance(config, MIMOConfig)
        for field, value in fields.items():
            got = getattr(config, field)
            if value is None:
                assert got is None, (name, field)
            else:
                assert got == pytest.approx(value), (name, field)


def test_overrides_return_a_new_config():
    config = get_preset("mixmo", alpha=1.0, unmix_mode="partial", rebalance_root=None)
    assert (config.alpha, config.unmix_mode, config.rebalance_root) == (1.0, "partial", None)
    assert PRESETS["mixmo"].alpha == 2.0  # the table itself is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"alfa": 1.0}, TypeError, r"unknown option\(s\) 'alfa'; valid options are alpha, cutmix_prob"),
        ({"encoder_init": "random"}, ValueError, r"encoder_init must be one of 'independent', 'aligned', 'colinear'"),
        ({"unmix_mode": "half"}, ValueError, r"unmix_mode must be one of 'none', 'full', 'partial', 'fadeout'"),
        ({"unmix_fraction": 0.0}, ValueError, r"unmix_fraction must be in \(0, 1\], but got 0"),
        ({"unmix_fraction": 1.2}, ValueError, r"unmix_fraction must be in \(0, 1\], but got 1.2"),
        ({"fadeout_end": -0.5}, ValueError, r"fadeout_end must be in \(0, 1\], but got -0.5"),
        ({"unmix_pooling": "max"}, ValueError, r"unmix_pooling must be one of 'mean', 'sum', but got 'max'"),
        ({"cutmix_prob": 2.0}, ValueError, r"cutmix_prob must be in \[0, 1\], but got 2"),
        ({"cutmix_ramp": 1.5}, ValueError, r"cutmix_ramp must be in \[0, 1\], but got 1.5"),
        ({"rebalance_root": 0.0}, ValueError, r"rebalance_root must be in \(0, inf\], but got 0"),
        ({"input_repetition": -0.1}, ValueError, r"input_repetition must be in \[0, 1\], but got -0.1"),
        ({"alpha": "2"}, TypeError, r"alpha must be a real number, but got '2' of type str"),
        ({"alpha": float("inf")}, ValueError, r"alpha must be finite, but got inf"),
        ({"shuffle_roles": "yes"}, TypeError, r"shuffle_roles must be a bool, but got 'yes'"),
    ],
)
def test_bad_overrides(overrides, error, match):
    with pytest.raises(error, match=match):
        get_preset("mixshare", **overrides)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"preset must be one of 'mimo', 'mixmo', 'unmix', 'unmix-aligned', 'mixshare', 'mixshare-partial', "
        r"but got 'MixShare'",
    ):
        get_preset("MixShare")
