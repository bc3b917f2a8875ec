"""Corruptions (mixshare_layers.evaluation.shift): references (scipy, PIL, colorsys, float64),
determinism, statistics, errors."""

from __future__ import annotations

import colorsys
import io
import itertools
import math

import pytest
import torch

from mixshare_layers.evaluation.shift import (
    CORRUPTIONS,
    SEVERITIES,
    SEVERITY_PARAMETERS,
    Corruption,
    _hash32,
    _mul32,
    _poisson,
    _Stream,
    corrupt,
)


def _smooth_images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-looking test images in (0.1, 0.9): smooth colour gradients plus mild texture."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = torch.rand(n, 3, 1, 1, generator=g) * 6.28
    freq = 2 + 4 * torch.rand(n, 3, 1, 1, generator=g)
    x = 0.5 + 0.3 * torch.sin(freq * xx + phase) * torch.cos(freq * yy - phase)
    return (x + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0.1, 0.9)


def test_tables_cover_every_family_and_severity():
    assert set(CORRUPTIONS) == set(SEVERITY_PARAMETERS)
    assert all(len(v) == len(SEVERITIES) for v in SEVERITY_PARAMETERS.values())
    with pytest.raises(TypeError):
        SEVERITY_PARAMETERS["contrast"] = (1.0,) * 5  # type: ignore[index]


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_shape_range_dtype_and_determinism(corruption, device):
    x = _smooth_images(4).to(device)
    for severity in SEVERITIES:
        y = corrupt(x, corruption, severity, seed=3)
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        assert torch.equal(y, corrupt(x, corruption, severity, seed=3))
    # float64 in, float64 out
    assert corrupt(x.double(), corruption, 2).dtype == torch.float64


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_an_image_gets_the_same_corruption_in_any_batch(corruption):
    x = _smooth_images(6)
    full = corrupt(x, corruption, 4, seed=11)
    idx = torch.tensor([5, 1, 3])
    part = corrupt(x[idx], corruption, 4, seed=11, index=idx)
    torch.testing.assert_close(part, full[idx], rtol=0, atol=1e-6)
    # an image alone, at its position
    one = corrupt(x[2:3], corruption, 4, seed=11, index=torch.tensor([2]))
    torch.testing.assert_close(one, full[2:3], rtol=0, atol=1e-6)


@pytest.mark.parametrize("corruption", ["gaussian_noise", "shot_noise", "impulse_noise"])
def test_seed_severity_and_index_change_the_noise(corruption):
    x = _smooth_images(2)
    a = corrupt(x, corruption, 3, seed=0)
    assert not torch.equal(a, corrupt(x, corruption, 3, seed=1))
    assert not torch.equal(a, corrupt(x, corruption, 3, seed=0, index=torch.tensor([7, 8])))
    # two images with the same pixels at different positions get different noise
    same = x[:1].expand(2, -1, -1, -1)
    b = corrupt(same, corruption, 3)
    assert not torch.equal(b[0], b[1])


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_damage_grows_with_severity(corruption):
    x = _smooth_images(12)
    damage = [float((corrupt(x, corruption, s) - x).abs().mean()) for s in SEVERITIES]
    assert damage[0] > 0
    assert all(later > earlier for earlier, later in itertools.pairwise(damage)), damage


def test_counter_hash_arithmetic_matches_python_integers():
    x = torch.randint(0, 2**32, (4096,), generator=torch.Generator().manual_seed(0))
    for c in (0x7FEB352D, 0x846CA68B, 1, 2**32 - 1):
        expected = torch.tensor([(int(v) * c) % 2**32 for v in x])
        assert torch.equal(_mul32(x, c), expected)

    def lowbias32(v: int) -> int:
        v ^= v >> 16
        v = (v * 0x7FEB352D) % 2**32
        v ^= v >> 15
        v = (v * 0x846CA68B) % 2**32
        return v ^ (v >> 16)

    assert _hash32(x[:512]).tolist() == [lowbias32(int(v)) for v in x[:512]]


def test_uniform_draws_are_uniform_and_uncorrelated():
    stream = _Stream(1234, torch.arange(4), 50_000)
    u = stream.uniform(0)  # (4, 50000)
    assert float(u.min()) > 0 and float(u.max()) < 1
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 5 / math.sqrt(12 * n)
    assert abs(float(u.var()) - 1 / 12) < 0.002
    # neighbouring counters, neighbouring images and the next draw are uncorrelated
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1]), (u, stream.uniform(1))):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(float(corr)) < 5 / math.sqrt(a.numel())
    # a subset of positions gives the same values as the full array
    flat = torch.tensor([0, 7, 50_000, 199_999])
    torch.testing.assert_close(stream.uniform(0, flat), u.flatten()[flat], rtol=0, atol=0)
    z = stream.normal(4)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


@pytest.mark.parametrize("rate", [0.4, 3.0, 9.5, 10.0, 37.0, 250.0])
def test_poisson_counts_follow_the_poisson_law(rate):
    stats = pytest.importorskip("scipy.stats")
    n = 100_000
    k = _poisson(torch.full((2, n // 2), rate, dtype=torch.float64), _Stream(99, torch.arange(2), n // 2))
    assert torch.equal(k, k.round()) and float(k.min()) >= 0
    values, counts = torch.unique(k, return_counts=True)
    expected = torch.from_numpy(stats.poisson(rate).pmf(values.numpy())) * n
    keep = expected > 20
    chi2 = float((((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    assert stats.chi2.sf(chi2, dof) > 1e-3, (chi2, dof)
    assert abs(float(k.mean()) - rate) < 5 * math.sqrt(rate / n)


def test_gaussian_noise_has_the_stated_standard_deviation():
    x = torch.full((8, 3, 32, 32), 0.5, dtype=torch.float64)
    for severity, sigma in zip(SEVERITIES, SEVERITY_PARAMETERS["gaussian_noise"], strict=True):
        noise = corrupt(x, "gaussian_noise", severity) - x  # no clipping at 0.5 +- 5 sigma
        assert abs(float(noise.mean())) < 3 * sigma / math.sqrt(noise.numel())
        assert abs(float(noise.std()) / sigma - 1) < 0.02


def test_shot_noise_is_scaled_poisson():
    x = torch.full((4, 3, 32, 32), 0.3, dtype=torch.float64)
    photons = SEVERITY_PARAMETERS["shot_noise"][0]
    y = corrupt(x, "shot_noise", 1)
    counts = y * photons
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-9)
    assert abs(float(counts.var()) / (0.3 * photons) - 1) < 0.05  # Poisson: variance = mean


def test_impulse_noise_replaces_the_stated_share_with_zeros_and_ones():
    x = torch.full((8, 3, 32, 32), 0.5)
    amount = SEVERITY_PARAMETERS["impulse_noise"][4]
    y = corrupt(x, "impulse_noise", 5)
    changed = y != 0.5
    assert set(torch.unique(y[changed]).tolist()) == {0.0, 1.0}
    assert abs(float(changed.float().mean()) - amount) < 4 * math.sqrt(amount / changed.numel())
    assert abs(float((y[changed] == 1).float().mean()) - 0.5) < 0.05


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(2, 3, 20, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for severity, sigma in zip(SEVERITIES, SEVERITY_PARAMETERS["gaussian_blur"], strict=True):
        ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest")
        torch.testing.assert_close(corrupt(x, "gaussian_blur", severity), torch.from_numpy(ref).clamp(0, 1))


def test_pixelate_matches_pil_box_resampling():
    image_mod = pytest.importorskip("PIL.Image")
    import numpy as np

    x = torch.rand(1, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    for severity, factor in zip(SEVERITIES, SEVERITY_PARAMETERS["pixelate"], strict=True):
        small = int(32 * factor)
        refs = []
        for c in range(2):
            img = image_mod.fromarray(x[0, c].numpy().astype(np.float32), mode="F")
            img = img.resize((small, small), image_mod.BOX).resize((32, 32), image_mod.BOX)
            refs.append(torch.from_numpy(np.array(img)))
        torch.testing.assert_close(corrupt(x, "pixelate", severity)[0], torch.stack(refs), rtol=0, atol=1e-5)


def test_jpeg_is_close_to_libjpeg():
    image_mod = pytest.importorskip("PIL.Image")
    import numpy as np

    x = (_smooth_images(3, size=32, seed=5) * 255).round() / 255
    for severity, quality in zip(SEVERITIES, SEVERITY_PARAMETERS["jpeg_compression"], strict=True):
        ours = corrupt(x, "jpeg_compression", severity)
        # outputs are 8-bit levels, like a decoder's
        torch.testing.assert_close(ours * 255, (ours * 255).round(), rtol=0, atol=1e-4)
        for i in range(x.shape[0]):
            pixels = (x[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            buf = io.BytesIO()
            image_mod.fromarray(pixels).save(buf, format="JPEG", quality=int(quality))
            buf.seek(0)
            ref = torch.from_numpy(np.array(image_mod.open(buf)).astype(np.float32)).permute(2, 0, 1)
            ours_i = ours[i] * 255
            gap = float((ours_i - ref).abs().mean())  # our codec vs libjpeg, grey levels
            loss = float((ref - x[i] * 255).abs().mean())  # what compression itself changes
            assert gap < 3.0 and gap < 0.3 * loss, (quality, gap, loss)
    gray = corrupt(x[:, :1], "jpeg_compression", 5)
    assert gray.shape == x[:, :1].shape and not torch.equal(gray, x[:, :1])


def test_contrast_matches_a_float64_reference():
    x = _smooth_images(3).double()
    for severity, factor in zip(SEVERITIES, SEVERITY_PARAMETERS["contrast"], strict=True):
        mean = x.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(corrupt(x, "contrast", severity), ((x - mean) * factor + mean).clamp(0, 1))


def test_brightness_raises_the_hsv_value():
    x = torch.rand(1, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x[0, :, 0, 0] = 0.0  # a black pixel
    for severity, amount in zip(SEVERITIES, SEVERITY_PARAMETERS["brightness"], strict=True):
        y = corrupt(x, "brightness", severity)
        for i in range(6):
            for j in range(6):
                h, s, v = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
                expected = colorsys.hsv_to_rgb(h, s, min(v + amount, 1.0))
                torch.testing.assert_close(y[0, :, i, j], torch.tensor(expected, dtype=torch.float64))


def test_empty_batch_and_module():
    assert corrupt(torch.rand(0, 3, 8, 8), "shot_noise", 1).shape == (0, 3, 8, 8)
    module = Corruption("contrast", 2, seed=4)
    assert repr(module) == "Corruption('contrast', 2, seed=4)"
    x = _smooth_images(2)
    assert torch.equal(module(x), corrupt(x, "contrast", 2, seed=4))


def test_errors():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"corruption must be one of .*'gaussian_noise'"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match=r"severity must be in 1..5, but got 6"):
        corrupt(x, "contrast", 6)
    with pytest.raises(ValueError, match="severity must be an integer >= 1, but got 0"):
        corrupt(x, "contrast", 0)
    with pytest.raises(TypeError, match=r"images must be floating point .* uint8"):
        corrupt((x * 255).to(torch.uint8), "contrast", 1)
    with pytest.raises(ValueError, match=r"images must have shape \(B, C, H, W\)"):
        corrupt(x[0], "contrast", 1)
    with pytest.raises(ValueError, match=r"index must be a tensor of shape \(B,\) = \(2,\), but got \(3,\)"):
        corrupt(x, "gaussian_noise", 1, index=torch.arange(3))
    with pytest.raises(TypeError, match="index must hold integers"):
        corrupt(x, "gaussian_noise", 1, index=torch.zeros(2))
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        corrupt(x, "gaussian_noise", 1, seed=-1)
    with pytest.raises(ValueError, match="jpeg_compression needs 1 or 3 channels"):
        corrupt(torch.rand(1, 2, 8, 8), "jpeg_compression", 1)
    with pytest.raises(ValueError, match=r"severity must be in 1\.\.5"):
        Corruption("contrast", 9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_cuda_gives_the_cpu_images(corruption):
    x = _smooth_images(4).double()
    cpu = corrupt(x, corruption, 3, seed=5)
    gpu = corrupt(x.cuda(), corruption, 3, seed=5).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-9 if corruption != "jpeg_compression" else 1 / 255 + 1e-9)
