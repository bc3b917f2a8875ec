"""MixInfo: masks, realised λ, exact area coverage at any resolution, transforms and round-trips."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from mixshare_layers import MixInfo
from mixshare_layers.functional import sample_mix_params
from mixshare_layers.mix_info import interval_coverage

RESOLUTIONS = [None, (8, 8), (7, 5), (3, 3), (1, 1), (40, 36)]  # native, coarser, odd, 1x1, finer than native


def _draw(b: int, m: int, *, cutmix: float, seed: int = 0, h: int = 32, w: int = 32) -> MixInfo:
    g = torch.Generator().manual_seed(seed)
    return sample_mix_params(b, m, h, w, alpha=2.0, cutmix_prob=cutmix, dtype=torch.float64, generator=g)


def _naive_coverage(lo: int, hi: int, native: int, target: int) -> torch.Tensor:
    """Coverage of ``target`` cells by ``[lo, hi)``, by splitting every native pixel into ``target`` sub-cells."""
    fine = torch.zeros(native * target, dtype=torch.float64)
    fine[lo * target : hi * target] = 1.0
    return fine.view(target, native).mean(dim=1)


@pytest.mark.parametrize("native,target", [(32, 32), (32, 8), (32, 7), (7, 3), (5, 12), (9, 1)])
def test_interval_coverage_matches_naive_subdivision(native, target):
    g = torch.Generator().manual_seed(native * 100 + target)
    lo = torch.randint(0, native + 1, (20,), generator=g)
    hi = (lo + torch.randint(0, native + 1, (20,), generator=g)).clamp_max(native)
    cov = interval_coverage(lo, hi, native, target, torch.float64)
    pairs = zip(lo.tolist(), hi.tolist(), strict=True)
    expected = torch.stack([_naive_coverage(a, b, native, target) for a, b in pairs])
    torch.testing.assert_close(cov, expected, rtol=0, atol=1e-12)
    # the covered length is preserved exactly: sum_j cov[j] * native / target == hi - lo
    torch.testing.assert_close(cov.sum(1) * native / target, (hi - lo).double(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("b", [0, 1, 5])
@pytest.mark.parametrize("cutmix", [0.0, 1.0])
def test_masks_shapes_sum_to_one_and_mean_is_lambda(m, b, cutmix):
    info = _draw(b, m, cutmix=cutmix, seed=10 * m + b)
    assert info.boxes.shape == (b, 4) and info.boxes.dtype == torch.int64
    assert info.inside.shape == info.outside.shape == info.ratios.shape == (b, m)
    assert info.cutmix.shape == () and info.cutmix.dtype == torch.bool
    assert bool(info.cutmix) == (cutmix == 1.0 and m > 1)
    torch.testing.assert_close(info.ratios.sum(1), torch.ones(b, dtype=torch.float64), rtol=0, atol=1e-12)
    for res in RESOLUTIONS:
        h, w = (info.height, info.width) if res is None else res
        masks = info.masks_at(*(res or (None, None)))
        assert masks.shape == (b, m, h, w)
        # masks sum to 1 at every pixel, at every resolution
        torch.testing.assert_close(masks.sum(1), torch.ones(b, h, w, dtype=torch.float64), rtol=0, atol=1e-12)
        # realised λ == mask mean, exactly, at the native and at coarser/odd/finer resolutions
        torch.testing.assert_close(masks.mean(dim=(2, 3)), info.ratios, rtol=0, atol=1e-12)


def test_native_cutmix_masks_are_binary_boxes():
    info = _draw(6, 2, cutmix=1.0, seed=3)
    masks = info.masks_at()
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    owner = info.inside.argmax(1)
    for k in range(6):
        y0, y1, x0, x1 = info.boxes[k].tolist()
        expected = torch.zeros(32, 32, dtype=torch.float64)
        expected[y0:y1, x0:x1] = 1.0
        torch.testing.assert_close(masks[k, owner[k]], expected, rtol=0, atol=0)
        torch.testing.assert_close(info.ratios[k, owner[k]], info.box_area()[k], rtol=0, atol=1e-12)


def test_coverage_is_separable():
    info = _draw(5, 3, cutmix=1.0, seed=4)
    cov_y, cov_x = info.coverage_at(7, 5)
    assert cov_y.shape == (5, 7) and cov_x.shape == (5, 5)
    masks = info.masks_at(7, 5)
    cov = cov_y[:, None, :, None] * cov_x[:, None, None, :]
    expected = cov * info.inside[:, :, None, None] + (1 - cov) * info.outside[:, :, None, None]
    torch.testing.assert_close(masks, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("b", [0, 1, 5])
def test_identity_covers_everything(b):
    info = MixInfo.identity(b, 3, 8, 6, dtype=torch.float64)
    torch.testing.assert_close(info.masks_at(4, 3), torch.ones(b, 3, 4, 3, dtype=torch.float64))
    assert info.box_area().tolist() == [0.0] * b
    assert not bool(info.cutmix)
    assert info.batch_size == b and info.num_subnetworks == 3


def test_faded_interpolates_to_identity():
    info = _draw(4, 3, cutmix=1.0, seed=5)
    torch.testing.assert_close(info.faded(0.0).masks_at(), info.masks_at())
    torch.testing.assert_close(info.faded(1.0).masks_at(), torch.ones(4, 3, 32, 32, dtype=torch.float64))
    r = 0.3
    torch.testing.assert_close(info.faded(torch.tensor(r)).masks_at(5, 5), info.masks_at(5, 5) * (1 - r) + r)


def test_to_and_index_select():
    info = _draw(5, 2, cutmix=1.0, seed=6)
    half = info.to(dtype=torch.float32)
    assert half.inside.dtype == half.ratios.dtype == torch.float32 and half.boxes.dtype == torch.int64
    sub = info.index_select(torch.tensor([4, 1]))
    torch.testing.assert_close(sub.masks_at(), info.masks_at()[[4, 1]])
    assert sub.height == info.height and sub.width == info.width


def test_deepcopy_and_pickle_round_trip():
    info = _draw(3, 3, cutmix=1.0, seed=7)
    for clone in (copy.deepcopy(info), pickle.loads(pickle.dumps(info))):
        assert isinstance(clone, MixInfo)
        for a, b in zip(clone, info, strict=True):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            else:
                assert a == b


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_subnetworks must be an integer >= 1, but got 0"):
        MixInfo.identity(2, 0, 4, 4)
    with pytest.raises(TypeError, match=r"height must be an int, but got 4.0"):
        MixInfo.identity(2, 2, 4.0, 4)
    with pytest.raises(ValueError, match="h must be an integer >= 1, but got 0"):
        MixInfo.identity(2, 2, 4, 4).masks_at(0, 3)
