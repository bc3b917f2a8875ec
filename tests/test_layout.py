"""Feature layouts: strided (B, C, h, w) views of channels-last maps and token grids, mixing and unmixing on them
against float64 references built on contiguous channels-first copies, gradients included."""

from __future__ import annotations

import pytest
import torch

from mixshare_layers import CutMixMixer, Unmixer
from mixshare_layers.functional import sample_mix_params
from mixshare_layers.functional.layout import as_maps, from_maps, grid_mean, token_grid
from mixshare_layers.functional.mixing import mix_reference
from mixshare_layers.functional.unmixing import unmix_pool, unmix_pool_reference


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _info(b: int, m: int, h: int, w: int, seed: int = 1):
    return sample_mix_params(b, m, h, w, cutmix_prob=1.0, generator=torch.Generator().manual_seed(seed))


def test_token_grid():
    assert token_grid(196, 14, 14) == (14, 14)
    assert token_grid(49, 14, 14) == (7, 7)  # a pooling transformer: the grid downsampled uniformly
    assert token_grid(8, 4, 8) == (2, 4) and token_grid(32, 4, 8) == (4, 8)
    with pytest.raises(ValueError, match=r"cannot lay 10 patch tokens on a grid with the aspect ratio of the 4x4"):
        token_grid(10, 4, 4)
    with pytest.raises(ValueError, match="num_patches must be an integer >= 1, but got 0"):
        token_grid(0, 4, 4)


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_as_maps_is_a_view_of_the_patch_grid(prefix):
    tokens = _x(2, prefix + 12, 5)
    maps = as_maps(tokens, "tokens", num_prefix_tokens=prefix, grid=(3, 4))
    assert maps.shape == (2, 5, 3, 4) and maps.data_ptr() == tokens[:, prefix:].data_ptr()
    for y in range(3):
        for x in range(4):
            torch.testing.assert_close(maps[:, :, y, x], tokens[:, prefix + 4 * y + x])
    torch.testing.assert_close(grid_mean(tokens, "tokens", num_prefix_tokens=prefix), maps.mean(dim=(2, 3)))
    nhwc = _x(2, 3, 4, 5)
    assert as_maps(nhwc, "channels_last").data_ptr() == nhwc.data_ptr()
    assert from_maps(as_maps(nhwc, "channels_last"), "channels_last").is_contiguous()
    torch.testing.assert_close(grid_mean(nhwc, "channels_last"), nhwc.mean(dim=(1, 2)))


def test_layout_errors():
    with pytest.raises(ValueError, match=r"layout must be one of 'channels_first', 'channels_last', 'tokens'"):
        grid_mean(_x(2, 3, 4, 4), "nhwc")
    with pytest.raises(ValueError, match=r"features must have shape \(B, N, C\), but got a tensor of shape"):
        grid_mean(_x(2, 3, 4, 4), "tokens")
    with pytest.raises(ValueError, match=r"hold 7 tokens, but num_prefix_tokens=1 and a 2x2 patch grid make 5"):
        as_maps(_x(2, 7, 3), "tokens", num_prefix_tokens=1, grid=(2, 2))
    with pytest.raises(ValueError, match=r"grid=\(h, w\) is needed"):
        as_maps(_x(2, 7, 3), "tokens")
    with pytest.raises(ValueError, match="no patch token after their 2 prefix tokens"):
        grid_mean(_x(2, 2, 3), "tokens", num_prefix_tokens=2)
    with pytest.raises(ValueError, match="num_prefix_tokens=1 is for layout='tokens', not 'channels_last'"):
        Unmixer("full", layout="channels_last", num_prefix_tokens=1)
    for unmixer in (Unmixer("full", layout="tokens", num_prefix_tokens=2), Unmixer("none", layout="tokens").eval()):
        p = unmixer.num_prefix_tokens
        with pytest.raises(ValueError, match=f"features of shape \\(2, {p}, 3\\) have no patch token after their {p}"):
            unmixer(_x(2, p, 3), _info(2, 2, 4, 4))


def _unmixer_cases():
    return [("full", {}), ("partial", {"fraction": 0.5}), ("fadeout", {})]


@pytest.mark.parametrize(("mode", "kw"), _unmixer_cases())
@pytest.mark.parametrize(("layout", "prefix"), [("channels_last", 0), ("tokens", 0), ("tokens", 2)])
def test_unmixer_layouts_match_the_channels_first_reference(mode, kw, layout, prefix):
    b, c, h, w = 3, 6, 4, 4
    info = _info(b, 2, 8, 8)  # the mix grid is 8x8, the features 4x4: exact area coverage
    grid = _x(b, c, h, w, seed=2)  # the reference, contiguous channels-first
    if layout == "channels_last":
        features = grid.permute(0, 2, 3, 1).contiguous()
    else:
        features = torch.cat([_x(b, prefix, c, seed=3), grid.flatten(2).transpose(1, 2)], dim=1)
    features.requires_grad_()
    ref_in = grid.clone().requires_grad_()
    unmixer = Unmixer(mode, layout=layout, num_prefix_tokens=prefix, **kw).train()
    reference = Unmixer(mode, **kw).train()
    out = unmixer(features, info, progress=0.1)
    expected = reference(ref_in, info, progress=0.1)
    torch.testing.assert_close(out, expected)
    g = _x(*out.shape, seed=4)
    out.backward(g)
    expected.backward(g)
    grad_grid = as_maps(features.grad, layout, num_prefix_tokens=prefix, grid=(h, w))
    torch.testing.assert_close(grad_grid, ref_in.grad)
    if layout == "tokens" and prefix:
        assert features.grad[:, :prefix].abs().max() == 0  # prefix tokens take no part in the pooling
    # eval: the plain grid average for every member
    torch.testing.assert_close(unmixer.eval()(features, info), grid_mean(features, layout, num_prefix_tokens=prefix)
                               .unsqueeze(1).expand(-1, 2, -1))  # fmt: skip


def test_unmix_pool_reads_channels_innermost_maps_without_copies():
    """The torch path pools a channels-last map through a (B, hw, C) view and writes its gradient in that layout."""
    nhwc = _x(2, 5, 5, 7).requires_grad_()
    info = _info(2, 3, 5, 5)
    out = unmix_pool(nhwc.permute(0, 3, 1, 2), info, backend="torch")
    expected = unmix_pool_reference(nhwc.detach().permute(0, 3, 1, 2), info)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert nhwc.grad.is_contiguous()  # the gradient comes back in the features' own layout
    assert torch.autograd.gradcheck(
        lambda f: unmix_pool(f.permute(0, 3, 1, 2), info, backend="torch"), (_x(2, 5, 5, 2).requires_grad_(),)
    )


def test_mixer_channels_last_matches_the_reference():
    mixer = CutMixMixer(3, cutmix_prob=1.0, layout="channels_last")
    enc = _x(2, 3, 6, 5, 4)  # (B, M, H, W, C)
    mixed, info = mixer(enc, generator=torch.Generator().manual_seed(0))
    assert mixed.shape == (2, 6, 5, 4) and (info.height, info.width) == (6, 5)
    torch.testing.assert_close(mixed.permute(0, 3, 1, 2), mix_reference(enc.permute(0, 1, 4, 2, 3), info))
    mixer.eval()
    torch.testing.assert_close(mixer(enc)[0], enc.sum(dim=1))
    assert "layout='channels_last'" in repr(mixer)
    with pytest.raises(ValueError, match=r"encodings must have shape \(B, M, H, W, C\)"):
        mixer(_x(2, 3, 4, 5))
