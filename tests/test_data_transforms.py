"""On-device batch transforms: crop + flip against a per-image float64 reference, normalisation statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mixshare_layers.data import Normalize, RandomCropFlip, channel_stats, random_crop_flip


def _reference_crop_flip(x: torch.Tensor, padding: int, offsets: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """One image at a time: pad, slice the window at the drawn offset, mirror if drawn."""
    h, w = x.shape[-2:]
    out = []
    for i in range(x.shape[0]):
        padded = F.pad(x[i].double(), (padding,) * 4)
        dy, dx = int(offsets[0, i]), int(offsets[1, i])
        window = padded[:, dy : dy + h, dx : dx + w]
        out.append(window.flip(-1) if bool(flip[i]) else window)
    return torch.stack(out)


@pytest.mark.parametrize("padding", [0, 1, 4])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_flip_matches_a_per_image_reference(padding, dtype):
    x = (torch.rand(16, 3, 7, 9) * 255).to(dtype)
    gen = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, padding, gen)
    replay = torch.Generator().manual_seed(3)  # the same draws, in the same order
    offsets = torch.randint(0, 2 * padding + 1, (2, 16), generator=replay)
    flip = torch.rand(16, generator=replay) < 0.5
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), _reference_crop_flip(x, padding, offsets, flip), rtol=0, atol=0)


def test_crop_flip_draws_are_uniform_and_independent_per_image():
    x = torch.arange(5.0).view(1, 1, 1, 5).expand(4000, 1, 1, 5).contiguous()
    out = random_crop_flip(x, 0, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 4).float()
    assert abs(flipped.mean().item() - 0.5) < 0.04  # 4000 fair coins: SE 0.008
    shifted = random_crop_flip(torch.ones(4000, 1, 1, 1), 2, torch.Generator().manual_seed(1))
    # a 1x1 image padded by 2: the window keeps the pixel only at offset (2, 2), 1 draw in 25 (SE 0.003)
    assert abs((shifted == 1).float().mean().item() - 1 / 25) < 0.012
    assert not torch.equal(out[:2000], out[2000:])


def test_crop_flip_module_is_replayable_and_off_in_eval():
    x = torch.rand(8, 3, 6, 6)
    a = RandomCropFlip(2, generator=torch.Generator().manual_seed(5))
    b = RandomCropFlip(2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.eval()(x), x)
    assert "padding=2" in repr(a)


def test_crop_flip_errors():
    with pytest.raises(ValueError, match="padding must be"):
        RandomCropFlip(-1)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, but got int$"):
        RandomCropFlip(2, generator=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\)"):
        RandomCropFlip(2)(torch.rand(3, 6, 6))


def test_channel_stats_match_float64_reference_in_chunks():
    images = torch.randint(0, 256, (50, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_stats(images, chunk=7)
    ref = images.double() / 255
    torch.testing.assert_close(mean, ref.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, ref.std(dim=(0, 2, 3), unbiased=False), rtol=1e-10, atol=1e-12)
    fmean, fstd = channel_stats(ref.float())
    torch.testing.assert_close(fmean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fstd, std, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one image"):
        channel_stats(images[:0])


def test_normalize_standardises_uint8_and_unit_floats_alike():
    images = torch.randint(0, 256, (40, 3, 6, 6), dtype=torch.uint8)
    norm = Normalize.from_images(images)
    out = norm(images)
    ref = (images.double() / 255 - norm.mean.double().view(1, -1, 1, 1)) / norm.std.double().view(1, -1, 1, 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm(images.float() / 255), out, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32
    assert abs(out.mean().item()) < 1e-4 and abs(out.std(unbiased=False).item() - 1) < 1e-3
    cl = Normalize.from_images(images, channels_last=True)(images)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, out)


def test_normalize_state_round_trip_and_errors():
    norm = Normalize([0.5, 0.4], [0.2, 0.1])
    fresh = Normalize([0.0, 0.0], [1.0, 1.0])
    fresh.load_state_dict(norm.state_dict())
    x = torch.rand(2, 2, 3, 3)
    assert torch.equal(fresh(x), norm(x)) and torch.equal(copy.deepcopy(norm)(x), norm(x))
    with pytest.raises(ValueError, match="one value per channel"):
        Normalize([0.5, 0.4], [0.2])
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize([0.5], [0.0])
    with pytest.raises(ValueError, match="x has 3 channels, but Normalize was built for 2"):
        norm(torch.rand(1, 3, 2, 2))
