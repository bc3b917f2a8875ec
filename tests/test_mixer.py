"""CutMixMixer and the mixing functional: shapes, semantics, sampler statistics, schedules, replay, gradients."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from mixshare_layers import CutMixMixer, MixInfo
from mixshare_layers.functional import (
    cutmix_probability,
    mix,
    mix_reference,
    sample_dirichlet,
    sample_gamma,
    sample_mix_params,
)


def _enc(b: int, m: int, c: int = 3, h: int = 8, w: int = 8, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, m, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _hand_mix(enc: torch.Tensor, info: MixInfo, scale: float) -> torch.Tensor:
    """float64 loop over members and pixels of the mask definition m_i(p) = cov(p) in_i + (1 - cov(p)) out_i."""
    b, m, c, h, w = enc.shape
    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    for k in range(b):
        y0, y1, x0, x1 = info.boxes[k].tolist()
        sy, sx = info.height / h, info.width / w
        for y in range(h):
            cy = max(0.0, min((y + 1) * sy, y1) - max(y * sy, y0)) / sy
            for x in range(w):
                cx = max(0.0, min((x + 1) * sx, x1) - max(x * sx, x0)) / sx
                cov = cy * cx
                for i in range(m):
                    mask = cov * float(info.inside[k, i]) + (1 - cov) * float(info.outside[k, i])
                    out[k, :, y, x] += scale * mask * enc[k, i, :, y, x].double()
    return out


# -- smoke / cardinality ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("b", [0, 1, 5])
def test_shapes(m, b):
    mixer = CutMixMixer(m, cutmix_prob=0.5)
    enc = _enc(b, m, dtype=torch.float32)
    mixed, info = mixer(enc)
    assert mixed.shape == (b, 3, 8, 8) and mixed.dtype == torch.float32
    assert info.ratios.shape == (b, m) and (info.height, info.width) == (8, 8)
    mixer.eval()
    mixed, info = mixer(enc)
    assert mixed.shape == (b, 3, 8, 8)
    torch.testing.assert_close(mixed, enc.sum(1))
    torch.testing.assert_close(info.masks_at(), torch.ones(b, m, 8, 8))


# -- feature: against float64 references -----------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("cutmix", [0.0, 1.0])
def test_mix_matches_hand_reference(m, cutmix, device):
    g = torch.Generator().manual_seed(m)
    info = sample_mix_params(3, m, 8, 8, cutmix_prob=cutmix, dtype=torch.float64, generator=g)
    enc = _enc(3, m, seed=m)
    expected = _hand_mix(enc, info, float(m))
    torch.testing.assert_close(mix(enc.to(device), info.to(device)).cpu(), expected)
    torch.testing.assert_close(mix_reference(enc, info), expected)
    # encodings at another resolution than the boxes: exact area coverage
    enc5 = _enc(3, m, h=5, w=3, seed=m + 1)
    torch.testing.assert_close(mix(enc5, info, 1.5), _hand_mix(enc5, info, 1.5))


def test_mix_float32_close_to_float64():
    info = sample_mix_params(4, 3, 8, 8, cutmix_prob=1.0, generator=torch.Generator().manual_seed(1))
    enc = _enc(4, 3)
    torch.testing.assert_close(mix(enc.float(), info), mix_reference(enc, info.to(dtype=torch.float64)).float())


def test_mix_gradcheck():
    info = sample_mix_params(
        2, 3, 4, 4, cutmix_prob=1.0, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    enc = _enc(2, 3, c=2, h=4, w=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda e: mix(e, info), (enc,))
    assert torch.autograd.gradgradcheck(lambda e: mix(e, info, 2.0), (enc,))


def test_module_equals_functional_and_replay():
    mixer = CutMixMixer(3, cutmix_prob=0.5)
    enc = _enc(5, 3)
    mixed, info = mixer(enc, generator=torch.Generator().manual_seed(7))
    info2 = mixer.make_params(enc, generator=torch.Generator().manual_seed(7))
    for a, b in zip(info, info2, strict=True):
        assert a is b is None or torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    torch.testing.assert_close(mixer.apply(enc, info2), mixed, rtol=0, atol=0)
    torch.testing.assert_close(mixed, mix(enc, info, 3.0))
    expected = sample_mix_params(
        5, 3, 8, 8, cutmix_prob=torch.tensor(0.5), dtype=torch.float64, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(info.ratios, expected.ratios, rtol=0, atol=0)


def test_seeded_generator_gives_identical_mixes():
    mixer = CutMixMixer(2, cutmix_prob=0.5)
    enc = _enc(6, 2)
    a = mixer(enc, generator=torch.Generator().manual_seed(11))
    b = mixer(enc, generator=torch.Generator().manual_seed(11))
    c = mixer(enc, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1].boxes, b[1].boxes, rtol=0, atol=0)
    assert not torch.equal(a[1].ratios, c[1].ratios)
    # the global RNG gives the same mix after the same manual_seed too
    torch.manual_seed(3)
    d = mixer(enc)
    torch.manual_seed(3)
    e = mixer(enc)
    torch.testing.assert_close(d[0], e[0], rtol=0, atol=0)


# -- semantics -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [2, 3, 4])
def test_alpha_zero_is_exactly_uniform_and_plain_sum(m):
    info = sample_mix_params(5, m, 8, 8, alpha=0.0, cutmix_prob=0.0, dtype=torch.float64)
    assert torch.equal(info.ratios, torch.full((5, m), 1.0 / m, dtype=torch.float64))
    mixer = CutMixMixer(m, alpha=0.0, cutmix_prob=0.0)
    enc = _enc(5, m)
    mixed, _ = mixer(enc)
    torch.testing.assert_close(mixed, enc.sum(1), rtol=1e-12, atol=1e-12)
    assert torch.equal(sample_dirichlet(-1.0, 2, m), torch.full((2, m), 1.0 / m))


@pytest.mark.parametrize("m", [3, 4])
def test_more_than_two_members_composition(m):
    b = 200
    g = torch.Generator().manual_seed(m)
    info = sample_mix_params(b, m, 16, 16, cutmix_prob=1.0, dtype=torch.float64, generator=g)
    lam = sample_dirichlet(2.0, b, m, dtype=torch.float64, generator=torch.Generator().manual_seed(m))  # same draw
    owner = info.inside.argmax(1)
    assert torch.equal(info.inside, torch.nn.functional.one_hot(owner, m).double())
    assert torch.equal(owner, owner[:1].expand(b))  # one owner per batch
    others = lam * (1 - info.inside)
    torch.testing.assert_close(info.outside, others / others.sum(1, keepdim=True))  # linear, in proportion to λ
    area = info.box_area()
    torch.testing.assert_close(info.ratios[torch.arange(b), owner], area)  # owner's λ = clipped box area
    torch.testing.assert_close(info.ratios, area[:, None] * info.inside + (1 - area[:, None]) * info.outside)


def test_linear_mixing_keeps_dirichlet_ratios():
    info = sample_mix_params(
        50, 3, 8, 8, cutmix_prob=0.0, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    lam = sample_dirichlet(2.0, 50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert not bool(info.cutmix) and int(info.boxes.abs().sum()) == 0
    torch.testing.assert_close(info.ratios, lam)
    torch.testing.assert_close(info.outside, lam)


def _numpy_clipped_owner_share(n: int, size: int, alpha: float, seed: int) -> np.ndarray:
    """MixMo's clipped CutMix box (side floor(S sqrt(λ)), uniform centre, corners clipped), simulated in float64."""
    rng = np.random.default_rng(seed)
    lam = rng.beta(alpha, alpha, n)
    cut = np.floor(size * np.sqrt(lam)).astype(np.int64)
    cy, cx = rng.integers(0, size, n), rng.integers(0, size, n)
    y0, y1 = np.clip(cy - cut // 2, 0, size), np.clip(cy + cut // 2, 0, size)
    x0, x1 = np.clip(cx - cut // 2, 0, size), np.clip(cx + cut // 2, 0, size)
    return (y1 - y0) * (x1 - x0) / float(size * size)


def test_box_area_statistics_match_clipped_sampler():
    ref = _numpy_clipped_owner_share(200_000, 32, 2.0, seed=0)  # standard error of the mean 3.4e-4
    n = 20_000
    info = sample_mix_params(
        n,
        2,
        32,
        32,
        cutmix_prob=1.0,
        shuffle_roles=False,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(0),
    )
    share = info.ratios[:, 0]
    torch.testing.assert_close(share, info.box_area())
    se = ref.std() / math.sqrt(n)  # about 1.1e-3
    # tolerance: 5 standard errors of our sample mean (plus the reference's own error); the mean is ~0.306, not 0.5
    assert abs(float(share.mean()) - ref.mean()) < 5 * se + 5 * ref.std() / math.sqrt(len(ref))
    assert 0.29 < ref.mean() < 0.32
    assert abs(float(share.std()) - ref.std()) < 0.01
    # the distribution, not just the mean: the deciles agree to within 0.01
    qs = np.linspace(0.1, 0.9, 9)
    np.testing.assert_allclose(np.quantile(share.numpy(), qs), np.quantile(ref, qs), atol=0.01)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_gamma_and_dirichlet_moments(alpha):
    n = 100_000
    g = sample_gamma(alpha, (n,), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert bool((g > 0).all())
    # Gamma(a, 1): mean a, variance a. Tolerance: 5 standard errors (var of the sample variance ~ (6a + 2a^2) / n).
    assert abs(float(g.mean()) - alpha) < 5 * math.sqrt(alpha / n)
    assert abs(float(g.var()) - alpha) < 5 * math.sqrt((6 * alpha + 2 * alpha**2) / n)
    m = 3
    d = sample_dirichlet(alpha, n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(d.sum(1), torch.ones(n, dtype=torch.float64))
    # symmetric Dirichlet: mean 1/M, variance (M - 1) / (M^2 (M alpha + 1)) per component
    var = (m - 1) / (m**2 * (m * alpha + 1))
    assert float((d.mean(0) - 1 / m).abs().max()) < 5 * math.sqrt(var / n)
    # the sample variance's relative standard error is about sqrt(2 / n) = 0.45% here: 3% is over 6 of them
    assert float((d.var(0) / var - 1).abs().max()) < 0.03
    # the mixer's own draw of λ (without a generator it may use torch's native sampler) has the same moments
    torch.manual_seed(0)
    lam = sample_mix_params(n, m, 1, 1, alpha=alpha, cutmix_prob=0.0, dtype=torch.float64).ratios
    assert float((lam.mean(0) - 1 / m).abs().max()) < 5 * math.sqrt(var / n)
    assert float((lam.var(0) / var - 1).abs().max()) < 0.03


def test_cutmix_ramp_schedule():
    progress = torch.linspace(0, 1, 49, dtype=torch.float64)
    ramp = 1 / 12
    expected = [0.5 if p < 1 - ramp else 0.5 * (1 - p) / ramp for p in progress.tolist()]
    got = cutmix_probability(0.5, ramp, progress.float())
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))
    assert float(cutmix_probability(0.5, 0.0, 1.0)) == 0.5
    mixer = CutMixMixer(2, cutmix_prob=1.0, cutmix_ramp=ramp)
    enc = _enc(2, 2)
    assert all(bool(mixer(enc, progress=0.5)[1].cutmix) for _ in range(20))
    assert not any(bool(mixer(enc, progress=1.0)[1].cutmix) for _ in range(20))
    torch.testing.assert_close(mixer.current_cutmix_prob(1 - ramp / 2), torch.tensor(0.5))
    # the empirical per-batch choice follows the probability
    uses = torch.stack([mixer(enc, progress=1 - ramp * 0.7)[1].cutmix for _ in range(400)]).double().mean()
    assert abs(float(uses) - 0.7) < 5 * math.sqrt(0.7 * 0.3 / 400)


@pytest.mark.parametrize("m", [2, 3])
def test_role_shuffle_per_batch(m):
    mixer = CutMixMixer(m, cutmix_prob=1.0)
    enc = _enc(6, m)
    owners = set()
    for _ in range(40):
        info = mixer(enc)[1]
        owner = info.inside.argmax(1)
        assert torch.equal(owner, owner[:1].expand(6))  # the same owner for the whole batch
        owners.add(int(owner[0]))
    assert owners == set(range(m))  # it varies across calls
    fixed = CutMixMixer(m, cutmix_prob=1.0, shuffle_roles=False)
    assert all(int(fixed(enc)[1].inside.argmax(1).max()) == 0 for _ in range(10))


def test_per_sample_boxes_and_ratios_differ():
    info = CutMixMixer(2, cutmix_prob=1.0)(_enc(16, 2, h=32, w=32))[1]
    assert len(set(map(tuple, info.boxes.tolist()))) > 1
    assert len(set(info.ratios[:, 0].tolist())) > 1


def test_scale_argument():
    mixer = CutMixMixer(2, scale=1.0, cutmix_prob=0.0, alpha=0.0)
    enc = _enc(3, 2)
    torch.testing.assert_close(mixer(enc)[0], enc.mean(1))


def test_deepcopy_pickle_state_dict():
    mixer = CutMixMixer(3, alpha=1.0, cutmix_prob=0.3)
    for clone in (copy.deepcopy(mixer), pickle.loads(pickle.dumps(mixer))):
        assert repr(clone) == repr(mixer)
        enc = _enc(2, 3)
        torch.testing.assert_close(
            clone(enc, generator=torch.Generator().manual_seed(0))[0],
            mixer(enc, generator=torch.Generator().manual_seed(0))[0],
        )
    assert "alpha=1" in repr(mixer) and "cutmix_prob=0.3" in repr(mixer)


# -- errors ----------------------------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="num_subnetworks must be an integer >= 1, but got 0"):
        CutMixMixer(0)
    with pytest.raises(TypeError, match="num_subnetworks must be an int"):
        CutMixMixer(2.0)
    with pytest.raises(ValueError, match=r"cutmix_prob must be in \[0, 1\], but got 1.5"):
        CutMixMixer(2, cutmix_prob=1.5)
    with pytest.raises(ValueError, match=r"cutmix_ramp must be in \[0, 1\], but got -0.1"):
        CutMixMixer(2, cutmix_ramp=-0.1)
    with pytest.raises(ValueError, match="alpha must be finite, but got nan"):
        CutMixMixer(2, alpha=float("nan"))
    with pytest.raises(TypeError, match="shuffle_roles must be a bool"):
        CutMixMixer(2, shuffle_roles=1)
    mixer = CutMixMixer(2)
    with pytest.raises(ValueError, match=r"encodings must have shape \(B, M, C, H, W\), but got a tensor of shape"):
        mixer(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="have 3 members on dim 1, but the mixer has num_subnetworks=2"):
        mixer(torch.randn(2, 3, 3, 8, 8))
    info = sample_mix_params(4, 2, 8, 8)
    with pytest.raises(ValueError, match=r"do not match the MixInfo, which describes B=4, M=2"):
        mix(torch.randn(3, 2, 1, 8, 8), info)
    with pytest.raises(ValueError, match="concentration must be > 0, but got 0"):
        sample_gamma(0.0, (3,))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 0, but got -1"):
        sample_mix_params(-1, 2, 8, 8)
