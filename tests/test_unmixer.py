"""Unmixer and masked pooling: float64 references, gradients, fadeout/partial semantics, warnings, errors."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch

from mixshare_layers import MixInfo, Unmixer
from mixshare_layers.functional import global_pool, sample_mix_params, unmix_pool, unmix_pool_reference


def _info(b: int, m: int, *, cutmix: float = 1.0, seed: int = 0, size: int = 16) -> MixInfo:
    g = torch.Generator().manual_seed(seed)
    return sample_mix_params(b, m, size, size, cutmix_prob=cutmix, dtype=torch.float64, generator=g)


def _feat(b: int, c: int, h: int, w: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _naive_pool(features, info, *, strength=0.0, num_unmixed=None, normalize=True) -> torch.Tensor:
    """Materialise every member's faded mask, channel by channel, in float64; then (masked) average."""
    b, c, h, w = features.shape
    m = info.num_subnetworks
    masks = info.masks_at(h, w, dtype=torch.float64)
    masks = masks + strength * (1 - masks)
    out = torch.zeros(b, m, c, dtype=torch.float64)
    k = c if num_unmixed is None else num_unmixed
    for i in range(m):
        for ch in range(c):
            mask = masks[:, i] if ch < k else torch.ones(b, h, w, dtype=torch.float64)
            total = (mask * features[:, ch].double()).sum(dim=(1, 2))
            if normalize:
                mass = mask.sum(dim=(1, 2))
                out[:, i, ch] = torch.where(mass > 0, total / mass.clamp_min(1e-300), torch.zeros_like(total))
            else:
                out[:, i, ch] = total / (h * w)
    return out


CASES = [  # (strength, num_unmixed): full, partial, fadeout (partially faded), fully faded
    (0.0, None),
    (0.0, 3),
    (0.3, None),
    (1.0, None),
]


@pytest.mark.parametrize("strength,num_unmixed", CASES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("m,hw", [(1, (4, 4)), (2, (16, 16)), (2, (5, 3)), (3, (8, 8)), (4, (1, 1))])
@pytest.mark.parametrize("cutmix", [0.0, 1.0])
def test_unmix_pool_matches_naive_reference(strength, num_unmixed, normalize, m, hw, cutmix):
    info = _info(3, m, cutmix=cutmix, seed=m)
    feats = _feat(3, 6, *hw, seed=m)
    kw = {"strength": strength, "num_unmixed": num_unmixed, "normalize": normalize}
    expected = _naive_pool(feats, info, **kw)
    got = unmix_pool(feats, info, **kw)
    assert got.shape == (3, m, 6) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(unmix_pool_reference(feats, info, **kw), expected, rtol=1e-10, atol=1e-12)


def test_unmix_pool_float32_and_device(device):
    info = _info(4, 2, seed=1)
    feats = _feat(4, 5, 8, 8, seed=1)
    got = unmix_pool(feats.float().to(device), info.to(device, torch.float32), strength=0.2, num_unmixed=2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), _naive_pool(feats, info, strength=0.2, num_unmixed=2).float())


@pytest.mark.parametrize("strength,num_unmixed", CASES[:3])
@pytest.mark.parametrize("normalize", [True, False])
def test_unmix_pool_gradcheck(strength, num_unmixed, normalize):
    info = _info(2, 3, seed=2, size=8)
    feats = _feat(2, 4, 3, 5, seed=2).requires_grad_()

    def fn(f):
        return unmix_pool(f, info, strength=strength, num_unmixed=num_unmixed, normalize=normalize)

    assert torch.autograd.gradcheck(fn, (feats,))
    # and the gradient equals the naive reference's
    (g1,) = torch.autograd.grad(fn(feats).square().sum(), feats)
    ref = _naive_pool(feats, info, strength=strength, num_unmixed=num_unmixed, normalize=normalize)
    (g2,) = torch.autograd.grad(ref.square().sum(), feats)
    torch.testing.assert_close(g1, g2)


def test_empty_member_mask_gives_zeros():
    # the box covers the whole map, so member 1's mask is empty
    info = MixInfo(
        boxes=torch.tensor([[0, 4, 0, 4]]),
        inside=torch.tensor([[1.0, 0.0]], dtype=torch.float64),
        outside=torch.tensor([[0.0, 1.0]], dtype=torch.float64),
        ratios=torch.tensor([[1.0, 0.0]], dtype=torch.float64),
        cutmix=torch.tensor(True),
        height=4,
        width=4,
    )
    feats = _feat(1, 3, 4, 4)
    out = unmix_pool(feats, info)
    torch.testing.assert_close(out[:, 0], feats.mean(dim=(2, 3)))
    assert torch.equal(out[:, 1], torch.zeros(1, 3, dtype=torch.float64))


# -- the module ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("b", [0, 1, 5])
@pytest.mark.parametrize("mode", ["none", "full", "partial", "fadeout"])
def test_module_shapes(m, b, mode):
    info = _info(b, m, seed=b)
    out = Unmixer(mode)(_feat(b, 8, 4, 4), info, progress=0.1)
    assert out.shape == (b, m, 8)


def test_fadeout_endpoints_and_module_equals_functional():
    info = _info(5, 3, seed=3)
    feats = _feat(5, 6, 4, 4, seed=3)
    fade = Unmixer("fadeout", fadeout_end=0.25)
    full = Unmixer("full")(feats, info)
    none = Unmixer("none")(feats, info)
    torch.testing.assert_close(none, global_pool(feats, 3))
    torch.testing.assert_close(fade(feats, info, progress=0.0), full)  # r = 0: full unmixing
    torch.testing.assert_close(fade(feats, info, progress=0.25), none)  # r = 1: no unmixing
    torch.testing.assert_close(fade(feats, info, progress=0.9), none)
    for p in (0.05, 0.1, 0.2):
        torch.testing.assert_close(
            fade(feats, info, progress=torch.tensor(p)), unmix_pool(feats, info, strength=p / 0.25)
        )
    assert float(fade.strength(0.1)) == pytest.approx(0.4)
    assert float(Unmixer("full").strength(0.5)) == 0.0
    assert not torch.allclose(full, none)  # the test is not vacuous


@pytest.mark.parametrize("fraction,channels", [(0.25, 10), (0.3, 10), (0.5, 7), (1.0, 6), (0.01, 6)])
def test_partial_touches_exactly_ceil_fraction_channels(fraction, channels):
    info = _info(4, 2, seed=4)
    feats = _feat(4, channels, 6, 6, seed=4)
    unmixer = Unmixer("partial", fraction=fraction)
    k = math.ceil(fraction * channels)
    assert unmixer.num_unmixed(channels) == k
    out = unmixer(feats, info)
    plain = global_pool(feats, 2)
    full = unmix_pool(feats, info)
    changed = ~torch.isclose(out, plain, rtol=0, atol=1e-12).all(dim=0).all(dim=0)  # (C,)
    assert changed.tolist() == [True] * k + [False] * (channels - k)
    torch.testing.assert_close(out[:, :, :k], full[:, :, :k])
    torch.testing.assert_close(out, unmix_pool(feats, info, num_unmixed=k))


def test_sum_pooling_module():
    info = _info(3, 2, seed=5)
    feats = _feat(3, 4, 4, 4, seed=5)
    torch.testing.assert_close(Unmixer("full", pooling="sum")(feats, info), _naive_pool(feats, info, normalize=False))


def test_identity_info_and_eval_give_global_average():
    feats = _feat(4, 5, 3, 3)
    gap = feats.mean(dim=(2, 3))[:, None].expand(-1, 3, -1)
    torch.testing.assert_close(unmix_pool(feats, MixInfo.identity(4, 3, 16, 16, dtype=torch.float64)), gap)
    unmixer = Unmixer("full").eval()
    torch.testing.assert_close(unmixer(feats, _info(4, 3)), gap)


def test_warns_once_for_1x1_maps():
    unmixer = Unmixer("full")
    info = _info(2, 2)
    with pytest.warns(UserWarning, match="1x1 feature maps.*unmixing has no effect") as record:
        unmixer(_feat(2, 3, 1, 1), info)
    assert record[0].filename == __file__  # the warning points at the caller, not into torch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unmixer(_feat(2, 3, 1, 1), info)  # only once per module
        Unmixer("full")(_feat(2, 3, 2, 1), info)  # not for larger maps
        Unmixer("none")(_feat(2, 3, 1, 1), info)  # nor when nothing is unmixed


def test_compiled_unmixer_keeps_the_warning_out_of_the_graph():
    unmixer = Unmixer("fadeout")
    compiled = torch.compile(unmixer, backend="eager", fullgraph=True)
    info = _info(2, 2).to(dtype=torch.float32)
    feats = _feat(2, 3, 1, 1, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # compiled: no warning, no graph break (fullgraph)
        out = compiled(feats, info, torch.tensor(0.1))
    with pytest.warns(UserWarning, match="1x1"):  # eager: the warning is still given
        expected = unmixer(feats, info, torch.tensor(0.1))
    torch.testing.assert_close(out, expected)


def test_deepcopy_pickle_repr():
    unmixer = Unmixer("partial", fraction=0.5, pooling="sum")
    for clone in (copy.deepcopy(unmixer), pickle.loads(pickle.dumps(unmixer))):
        assert repr(clone) == repr(unmixer)
    assert "mode='partial'" in repr(unmixer) and "fraction=0.5" in repr(unmixer)


def test_errors():
    with pytest.raises(ValueError, match=r"mode must be one of 'none', 'full', 'partial', 'fadeout', but got 'half'"):
        Unmixer("half")
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], but got 0"):
        Unmixer("partial", fraction=0.0)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], but got 1.5"):
        Unmixer("partial", fraction=1.5)
    with pytest.raises(ValueError, match=r"fadeout_end must be in \(0, 1\]"):
        Unmixer("fadeout", fadeout_end=0)
    with pytest.raises(ValueError, match=r"pooling must be one of 'mean', 'sum', but got 'max'"):
        Unmixer(pooling="max")
    info = _info(4, 2)
    with pytest.raises(ValueError, match=r"features have batch size 3 .* MixInfo describes 4 samples"):
        Unmixer("full")(_feat(3, 2, 4, 4), info)
    with pytest.raises(ValueError, match=r"features have batch size 3 .* MixInfo describes 4 samples"):
        unmix_pool(_feat(3, 2, 4, 4), info)
    with pytest.raises(ValueError, match=r"features must have shape \(B, C, h, w\), but got a tensor of shape"):
        Unmixer("full")(torch.randn(4, 2, 3), info)
    with pytest.raises(TypeError, match=r"features must be a torch.Tensor"):
        unmix_pool([1.0], info)
    with pytest.raises(ValueError, match=r"num_unmixed must be in \[0, C=2\], but got 3"):
        unmix_pool(_feat(4, 2, 4, 4), info, num_unmixed=3)
