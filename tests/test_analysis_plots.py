"""Headless influence histograms (mixshare_layers.analysis.plots)."""

from __future__ import annotations

import pytest
import torch

from mixshare_layers.analysis.plots import feature_order, plot_influence

pytest.importorskip("matplotlib")


@pytest.mark.parametrize("m", [2, 3, 4])
def test_plot_writes_png_and_svg(tmp_path, m):
    h = torch.rand(m, 24)
    files = plot_influence(h, tmp_path / "sub" / "encoder", title=f"M = {m}")
    assert [f.name for f in files] == ["encoder.png", "encoder.svg"]
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = files[1].read_text()
    assert "<svg" in svg and "subnetwork" in svg and f"subnetwork {m - 1}" in svg
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["encoder.png", "encoder.svg"]  # no temp files


def test_plot_other_formats_and_orders(tmp_path):
    h = torch.rand(2, 10)
    for sort in ("owner", "sharing", "none"):
        (path,) = plot_influence(h, tmp_path / sort, formats=["pdf"], sort=sort)
        assert path.read_bytes()[:5] == b"%PDF-"


def test_feature_order_groups_private_features_by_owner():
    h = torch.tensor([[0.1, 5.0, 0.2, 3.0, 1.0], [4.0, 0.1, 2.0, 0.1, 1.0]])
    # owner 0: features 1 (5.0), 3 (3.0), 4 (tie, 1.0: argmax picks subnetwork 0); owner 1: 0 (4.0), 2 (2.0)
    assert feature_order(h, "owner").tolist() == [1, 3, 4, 0, 2]
    assert feature_order(h, "sharing").tolist()[-1] == 4  # the only fully shared feature comes last
    assert feature_order(h, "none").tolist() == [0, 1, 2, 3, 4]


def test_plot_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="formats must be one of 'png', 'svg', 'pdf', but got 'jpg'"):
        plot_influence(torch.rand(2, 3), tmp_path / "x", formats=["jpg"])
    with pytest.raises(ValueError, match="sort must be one of 'owner', 'sharing', 'none'"):
        plot_influence(torch.rand(2, 3), tmp_path / "x", sort="random")
    with pytest.raises(ValueError, match="at least 2 subnetworks"):
        plot_influence(torch.rand(1, 3), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
