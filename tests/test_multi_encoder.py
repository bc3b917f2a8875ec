"""MultiEncoder: fused grouped conv vs per-member float64 references, inits, folding, generic templates, errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixshare_layers import MultiEncoder


def _conv(**kw) -> nn.Conv2d:
    torch.manual_seed(0)
    args = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1, "bias": True, **kw}
    return nn.Conv2d(**args).double()


def _x(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("b", [0, 1, 5])
@pytest.mark.parametrize("conv_kw", [{}, {"stride": 2, "groups": 2, "bias": False}, {"dilation": 2, "padding": 2}])
def test_fused_matches_per_member_convs(m, b, conv_kw):
    template = _conv(**conv_kw)
    enc = MultiEncoder(template, m, init="independent")
    x = _x(b, m, 4, 9, 7)
    out = enc(x)
    w, bias = enc.kernels(), enc.bias
    expected = torch.stack(
        [
            F.conv2d(
                x[:, i],
                w[i],
                None if bias is None else bias[i],
                template.stride,
                template.padding,
                template.dilation,
                template.groups,
            )
            for i in range(m)
        ],
        dim=1,
    )
    assert out.shape == expected.shape == (b, m, 6, *expected.shape[-2:])
    torch.testing.assert_close(out, expected)
    # eval input (B, C, H, W): the sum of the M encoders, one convolution with the summed kernel == folded_conv
    x4 = _x(b, 4, 9, 7)
    summed = enc(x4)
    expected_sum = sum(
        F.conv2d(
            x4,
            w[i],
            None if bias is None else bias[i],
            template.stride,
            template.padding,
            template.dilation,
            template.groups,
        )
        for i in range(m)
    )
    torch.testing.assert_close(summed, expected_sum)
    torch.testing.assert_close(enc.folded_conv()(x4), expected_sum)


def test_independent_copies_differ_and_aligned_are_identical():
    template = _conv()
    indep = MultiEncoder(template, 3, init="independent")
    k = indep.kernels()
    assert not torch.equal(k[0], k[1]) and not torch.equal(k[0], template.weight)
    aligned = MultiEncoder(template, 3, init="aligned")
    for i in range(3):
        assert torch.equal(aligned.kernels()[i], template.weight.detach())
        assert torch.equal(aligned.bias[i], template.bias.detach())
    # the template is left untouched
    assert torch.equal(template.weight, _conv().weight)


def test_colinear_copies_are_proportional_with_scalars_in_range():
    template = _conv(bias=False)
    enc = MultiEncoder(
        template, 4, init="colinear", colinear_range=(0.5, 1.5), generator=torch.Generator().manual_seed(0)
    )
    base = template.weight.detach().flatten()
    scalars = []
    for i in range(4):
        ki = enc.kernels()[i].detach().flatten()
        s = float(ki @ base / (base @ base))
        torch.testing.assert_close(ki, s * base)  # exactly a multiple of the template kernel
        scalars.append(s)
    assert all(0.5 <= s <= 1.5 for s in scalars)
    assert len(set(scalars)) == 4
    # replayable with a seeded generator
    again = MultiEncoder(template, 4, init="colinear", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.kernels(), enc.kernels())


@pytest.mark.parametrize("init", ["aligned", "colinear"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_preserve_sum_reproduces_the_template(init, m):
    template = _conv()
    enc = MultiEncoder(template, m, init=init, preserve_sum=True)
    x = _x(2, 4, 6, 6)
    torch.testing.assert_close(enc(x), template(x))
    torch.testing.assert_close(enc.kernels().sum(0), template.weight)
    if init == "aligned":
        torch.testing.assert_close(enc.kernels()[0], template.weight / m)


def test_generic_template_runs_member_by_member():
    torch.manual_seed(0)
    template = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).double().eval()
    enc = MultiEncoder(template, 2, init="aligned").eval()
    assert not enc.is_linear and enc.encoders is not None
    x = _x(3, 2, 3, 5, 5)
    torch.testing.assert_close(enc(x), torch.stack([template(x[:, 0]), template(x[:, 1])], 1))
    x4 = _x(3, 3, 5, 5)
    torch.testing.assert_close(enc(x4), 2 * template(x4))
    with pytest.raises(TypeError, match="cannot be folded into one convolution"):
        enc.folded_conv()
    with pytest.raises(TypeError, match=r"kernels\(\) is only defined for nn.Conv2d encoders"):
        enc.kernels()
    # the M copies of a non-linear encoder fold into their sum, run on the same input
    torch.testing.assert_close(enc.folded()(x4), enc(x4))
    # reflect padding is not a plain zero-padded conv: not fused, but linear in its weights, so it folds into one
    reflect = MultiEncoder(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").double(), 2, init="colinear")
    assert not reflect.fused and reflect.is_linear
    single = reflect.folded_conv()
    assert isinstance(single, nn.Conv2d) and single.padding_mode == "reflect"
    torch.testing.assert_close(single(x4), reflect(x4))


def test_preserve_sum_of_a_non_linear_template_scales_its_outputs():
    """Aligned copies of a module that is not linear in its weights keep them; their outputs are scaled by 1 / M."""
    torch.manual_seed(0)
    template = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU()).double().eval()
    for m in (1, 2, 3):
        enc = MultiEncoder(template, m, init="aligned", preserve_sum=True).eval()
        assert enc.output_scale == 1 / m
        x4, x5 = _x(2, 3, 6, 6), _x(2, m, 3, 6, 6)
        torch.testing.assert_close(enc(x4), template(x4))  # the test-time sum is the template
        torch.testing.assert_close(enc.folded()(x4), template(x4))
        torch.testing.assert_close(enc(x5), torch.stack([template(x5[:, i]) / m for i in range(m)], 1))


class _StandardisedConv(nn.Conv2d):
    """A conv subclass whose forward differs from its weight's plain convolution (like timm's StdConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_conv_subclass_with_its_own_forward_is_run_as_itself():
    torch.manual_seed(0)
    template = _StandardisedConv(3, 4, 3, padding=1).double()
    enc = MultiEncoder(template, 2, init="aligned")
    assert not enc.fused and not enc.is_linear
    x = _x(2, 2, 3, 5, 5)
    torch.testing.assert_close(enc(x), torch.stack([template(x[:, 0]), template(x[:, 1])], 1))
    # scaling its weight does not scale its output: it cannot be colinear, and preserves a sum by output scaling
    preserved = MultiEncoder(template, 2, init="aligned", preserve_sum=True)
    assert preserved.output_scale == 0.5 and not preserved.is_linear
    torch.testing.assert_close(preserved(x[:, 0]), template(x[:, 0]))
    with pytest.raises(TypeError, match=r"init='colinear' needs a linear template.*_StandardisedConv"):
        MultiEncoder(template, 2, init="colinear")


def test_gradcheck_fused():
    enc = MultiEncoder(_conv(in_channels=2, out_channels=3), 2)
    x = _x(1, 2, 2, 3, 3).requires_grad_()
    assert torch.autograd.gradcheck(enc, (x,))
    assert torch.autograd.gradcheck(enc, (_x(1, 2, 3, 3).requires_grad_(),))


def test_state_dict_deepcopy_pickle():
    enc = MultiEncoder(_conv(), 3)
    fresh = MultiEncoder(_conv(), 3)
    fresh.load_state_dict(enc.state_dict())
    x = _x(2, 3, 4, 5, 5)
    for other in (fresh, copy.deepcopy(enc), pickle.loads(pickle.dumps(enc))):
        torch.testing.assert_close(other(x), enc(x), rtol=0, atol=0)
    assert "num_subnetworks=3" in repr(enc) and "init='independent'" in repr(enc)


def test_errors():
    with pytest.raises(ValueError, match=r"init must be one of 'independent', 'aligned', 'colinear', but got 'same'"):
        MultiEncoder(_conv(), 2, init="same")
    with pytest.raises(ValueError, match="num_subnetworks must be an integer >= 1, but got 0"):
        MultiEncoder(_conv(), 0)
    with pytest.raises(TypeError, match=r"template must be an nn.Module, but got Tensor"):
        MultiEncoder(torch.zeros(3), 2)
    with pytest.raises(TypeError, match="init='colinear' needs a linear template"):
        MultiEncoder(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), 2, init="colinear")
    with pytest.raises(ValueError, match=r"colinear_range\[0\] must be in \(0, inf\]"):
        MultiEncoder(_conv(), 2, init="colinear", colinear_range=(0.0, 1.0))
    enc = MultiEncoder(_conv(), 2)
    with pytest.raises(ValueError, match=r"has 3 members on dim 1, but the MultiEncoder has num_subnetworks=2"):
        enc(_x(1, 3, 4, 5, 5))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\) or \(B, M, C, H, W\)"):
        enc(_x(4, 5, 5))


def test_channels_last_model_conversion_keeps_function():
    """`module.to(memory_format=torch.channels_last)` works (the kernel is stored 4-D) and changes nothing."""
    enc = MultiEncoder(nn.Conv2d(3, 8, 3, padding=1), 3, init="independent")
    x5 = torch.randn(2, 3, 3, 9, 9)
    x4 = torch.randn(2, 3, 9, 9)
    before5, before4 = enc(x5), enc(x4)
    enc = enc.to(memory_format=torch.channels_last)
    assert enc.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(enc(x5), before5)
    torch.testing.assert_close(enc(x4.contiguous(memory_format=torch.channels_last)), before4)
    assert enc.kernels().shape == (3, 8, 3, 3, 3)


@pytest.mark.parametrize("path", ["grouped", "dense", "split"])
@pytest.mark.parametrize("bias", [True, False])
def test_training_paths_agree_in_float64(monkeypatch, path, bias):
    """The three ways of running the fused encoders in training give the same outputs and gradients."""
    from mixshare_layers.layers import encoder as multi_encoder

    torch.manual_seed(0)
    enc = MultiEncoder(nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=bias), 3).double()
    x = torch.randn(4, 3, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    want = torch.stack([F.conv2d(x[:, i], enc.kernels()[i], None if enc.bias is None else enc.bias[i], 2, 1)
                        for i in range(3)], dim=1)  # fmt: skip
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, enc.weight], grad)
    monkeypatch.setattr(multi_encoder.MultiEncoder, "_train_path", staticmethod(lambda device: path))
    out = enc(x)
    torch.testing.assert_close(out, want)
    for got, ref in zip(torch.autograd.grad(out, [x, enc.weight], grad), want_grads, strict=True):
        torch.testing.assert_close(got, ref)


def test_independent_copies_are_drawn_by_the_backbones_initialiser_entirely():
    """A fused conv: each of the M kernels Kaiming-normal with fan-out (ResNet's rule, std sqrt(2 / (64 * 49))) and
    different; a generic template (conv + GroupNorm, its values all overwritten first) redrawn entirely. 3 x 9408
    weights: 6 standard errors of the standard deviation are 2.5 %; PyTorch's default std would be 0.048 (-> 0.029
    expected)."""
    from mixshare_layers.adapters.inits import TORCHVISION_INITS

    reinit = TORCHVISION_INITS["resnet"]
    torch.manual_seed(0)
    enc = MultiEncoder(nn.Conv2d(3, 64, 7, bias=False), 3, reinit=reinit)
    kernels = enc.kernels().detach()
    n = kernels.numel()
    assert abs(float(kernels.std()) / (2 / (64 * 49)) ** 0.5 - 1) <= 6 / (2 * n) ** 0.5
    assert not torch.equal(kernels[0], kernels[1])
    template = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16))
    with torch.no_grad():
        for p in template.parameters():
            p.fill_(2.5)
    generic = MultiEncoder(template, 2, reinit=reinit)
    for copy_ in generic.encoders:
        assert bool(copy_[1].weight.eq(1).all()) and not copy_[1].bias.any()
        assert not bool(copy_[0].weight.eq(2.5).any()) and not bool(copy_[0].bias.eq(2.5).any())
