"""MultiHead: shared and per-member inputs vs per-head float64 linears, from_linear / as_linear, errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixshare_layers import MultiHead


def _x(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("b", [0, 1, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_per_head_linear(m, b, bias):
    heads = MultiHead(7, 4, m, bias=bias, dtype=torch.float64)
    assert heads.weight.shape == (m, 4, 7)
    shared = _x(b, 7)
    per_member = _x(b, m, 7)

    def head(i, v):
        return F.linear(v, heads.weight[i], None if heads.bias is None else heads.bias[i])

    out_shared = heads(shared)
    out_member = heads(per_member)
    assert out_shared.shape == out_member.shape == (b, m, 4)
    torch.testing.assert_close(out_shared, torch.stack([head(i, shared) for i in range(m)], 1))
    torch.testing.assert_close(out_member, torch.stack([head(i, per_member[:, i]) for i in range(m)], 1))
    # as_linear stacks the heads member-major
    torch.testing.assert_close(heads.as_linear()(shared).view(b, m, 4), out_shared)


def test_heads_are_initialised_independently_like_linear():
    torch.manual_seed(0)
    heads = MultiHead(16, 5, 3)
    assert not torch.equal(heads.weight[0], heads.weight[1])
    bound = 1 / 16**0.5
    assert float(heads.weight.detach().abs().max()) <= bound and float(heads.bias.detach().abs().max()) <= bound


def test_from_module_reinit_draws_each_linear_head_independently():
    torch.manual_seed(0)
    lin = nn.Linear(64, 10).double()
    before = lin.weight.detach().clone()

    def he(module):
        nn.init.kaiming_normal_(module.weight)
        nn.init.zeros_(module.bias)

    heads = MultiHead.from_module(lin, 3, copy_weights=False, reinit=he)
    assert torch.equal(lin.weight, before)  # the template is not touched
    assert heads.weight.dtype == torch.float64 and heads.weight.shape == (3, 10, 64)
    assert not heads.bias.detach().any()
    assert not torch.equal(heads.weight[0], heads.weight[1]) and not torch.equal(heads.weight[1], heads.weight[2])
    assert abs(float(heads.weight.detach().std()) / (2 / 64) ** 0.5 - 1) < 0.05
    no_bias = MultiHead.from_module(
        nn.Linear(8, 2, bias=False), 2, copy_weights=False, reinit=lambda m: nn.init.ones_(m.weight)
    )
    assert no_bias.bias is None and bool(no_bias.weight.eq(1).all())
    assert heads.members is None  # still the linear storage: one batched matmul
    with pytest.raises(TypeError, match="reinit must be callable or None, but got str"):
        MultiHead.from_module(lin, 2, copy_weights=False, reinit="he")


def test_from_linear_copies_the_classifier():
    lin = nn.Linear(6, 3).double()
    heads = MultiHead.from_linear(lin, 4)
    x = _x(5, 6)
    expected = lin(x)[:, None].expand(-1, 4, -1)
    torch.testing.assert_close(heads(x), expected)
    no_bias = MultiHead.from_linear(nn.Linear(6, 3, bias=False), 2)
    assert no_bias.bias is None


def test_gradcheck():
    heads = MultiHead(3, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(heads, (_x(2, 2, 3).requires_grad_(),))
    assert torch.autograd.gradcheck(heads, (_x(2, 3).requires_grad_(),))


def test_state_dict_deepcopy_pickle():
    heads = MultiHead(6, 3, 2)
    fresh = MultiHead(6, 3, 2)
    fresh.load_state_dict(heads.state_dict())
    x = torch.randn(4, 2, 6)
    for other in (fresh, copy.deepcopy(heads), pickle.loads(pickle.dumps(heads))):
        torch.testing.assert_close(other(x), heads(x), rtol=0, atol=0)
    assert repr(heads) == "MultiHead(in_features=6, num_classes=3, num_subnetworks=2, bias=True)"


def test_errors():
    with pytest.raises(ValueError, match="num_subnetworks must be an integer >= 1, but got 0"):
        MultiHead(4, 3, 0)
    with pytest.raises(ValueError, match="in_features must be an integer >= 1, but got 0"):
        MultiHead(0, 3, 2)
    with pytest.raises(TypeError, match=r"linear must be an nn.Linear, but got Conv2d"):
        MultiHead.from_linear(nn.Conv2d(3, 3, 1), 2)
    heads = MultiHead(4, 3, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, D=4\), but got \(2, 5\)"):
        heads(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"x must have shape \(B, M=2, D=4\), but got \(2, 3, 4\)"):
        heads(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(B, D\) or \(B, M, D\)"):
        heads(torch.randn(2))


# -- generic heads: M copies of any module ---------------------------------------------------------------------------
def _mlp() -> nn.Module:
    return nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 5), nn.GELU(), nn.Dropout(0.5), nn.Linear(5, 3)).double()


def test_generic_heads_copy_the_module_and_apply_head_i_to_row_i():
    torch.manual_seed(0)
    head = _mlp().eval()
    heads = MultiHead.from_module(head, 3).eval()
    assert not heads.is_linear and heads.num_classes == 3 and heads.in_features == 6
    shared, per_member = _x(4, 6), _x(4, 3, 6)
    torch.testing.assert_close(heads(shared), head(shared)[:, None].expand(-1, 3, -1))
    torch.testing.assert_close(heads(per_member), torch.stack([head(per_member[:, i]) for i in range(3)], 1))
    # copies, not shared modules: training one head leaves the others
    with torch.no_grad():
        heads.members[1][4].bias.add_(1.0)
    torch.testing.assert_close(heads(shared)[:, 0], head(shared))
    assert not torch.allclose(heads(shared)[:, 1], head(shared))
    # each member keeps the module's own train-time behaviour (here: its own dropout masks)
    heads.train()
    out = heads(shared)
    assert out.shape == (4, 3, 3) and not torch.equal(out[:, 0], out[:, 2])


def test_generic_heads_initialised_independently_and_first_layer_weights():
    torch.manual_seed(0)
    heads = MultiHead.from_module(_mlp(), 2, copy_weights=False)
    w = heads.first_layer_weights()  # the LayerNorm has no columns: the first Linear is read
    assert w.shape == (2, 5, 6) and not torch.equal(w[0], w[1])
    marker = []
    MultiHead.from_module(_mlp(), 2, copy_weights=False, reinit=lambda m: marker.append(type(m).__name__))
    assert marker == ["Sequential", "Sequential"]
    # a plain nn.Linear on vectors keeps the batched storage (copied, or initialised like nn.Linear)
    lin = nn.Linear(6, 3)
    assert MultiHead.from_module(lin, 2).is_linear and torch.equal(MultiHead.from_module(lin, 2).weight[1], lin.weight)
    conv = MultiHead.from_module(nn.Sequential(nn.Conv2d(4, 3, 1), nn.Flatten(1)), 2, input_ndim=3)
    assert conv.first_layer_weights().shape == (2, 3, 4) and conv(torch.randn(5, 4, 1, 1)).shape == (5, 2, 3)
    with pytest.raises(TypeError, match="as_linear\\(\\) needs linear heads"):
        heads.as_linear()
    with pytest.raises(TypeError, match=r"no nn\.Linear or nn\.Conv2d layer"):
        MultiHead.from_module(nn.Flatten(1), 2).first_layer_weights()


def test_generic_heads_state_dict_deepcopy_pickle_and_errors():
    heads = MultiHead.from_module(_mlp(), 2).eval()
    fresh = MultiHead.from_module(_mlp(), 2, copy_weights=False).eval()
    fresh.load_state_dict(heads.state_dict())
    x = _x(4, 2, 6)
    for other in (fresh, copy.deepcopy(heads), pickle.loads(pickle.dumps(heads))):
        torch.testing.assert_close(other(x), heads(x), rtol=0, atol=0)
    assert "generic" in repr(heads)
    with pytest.raises(ValueError, match=r"x must have 2 dims \(B, \*S\), shared by the heads, or 3"):
        heads(_x(4, 3, 2, 6))
    with pytest.raises(TypeError, match=r"head must be an nn\.Module, but got int"):
        MultiHead.from_module(3, 2)


def test_generic_heads_with_an_in_place_first_layer_get_their_own_inputs():
    """torchvision's EfficientNet / MNASNet heads start with Dropout(inplace=True): run on a shared input (or a view of
    the pooled features), one head would write into the others' input."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Dropout(0.5, inplace=True), nn.Linear(6, 3)).double()
    heads = MultiHead.from_module(head, 3).train()
    assert heads.copy_inputs
    x = _x(8, 6).requires_grad_()
    x_before = x.detach().clone()
    out = heads(x)
    out.sum().backward()  # no in-place error
    torch.testing.assert_close(x.detach(), x_before)  # the shared input is untouched
    per_member = _x(8, 3, 6).requires_grad_()
    heads(per_member.expand(-1, -1, -1)).sum().backward()
    assert per_member.grad is not None and bool(torch.isfinite(per_member.grad).all())
    heads.eval()
    torch.testing.assert_close(heads(x_before), head.eval()(x_before)[:, None].expand(-1, 3, -1))


def _std_within(values: torch.Tensor, expected: float) -> bool:
    """The sample standard deviation of ``values`` within 6 of its standard errors (at most ``1 / sqrt(2 n)``
    relative for normal and uniform draws) of ``expected``."""
    n = values.numel()
    return abs(float(values.detach().double().std()) / expected - 1) <= 6 / (2 * n) ** 0.5


@pytest.mark.parametrize("init", ["torch", "mixmo"])
def test_the_wrns_reinit_redraws_a_norm_and_linear_head_entirely(init):
    """A pretrained LayerNorm (2.5 / -0.7) goes back to 1 / 0, in the M heads and through ``reset_parameters()``."""
    from mixshare_layers.models import wide_resnet

    reinit = wide_resnet(10, 1, num_classes=10, init=init).mimo_split().reinit
    head = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 10))
    with torch.no_grad():
        head[0].weight.fill_(2.5)
        head[0].bias.fill_(-0.7)
    heads = MultiHead.from_module(head, 2, copy_weights=False, reinit=reinit)
    for member in heads.members:
        assert bool(member[0].weight.eq(1).all()) and not member[0].bias.any()
    with torch.no_grad():
        for member in heads.members:
            member[0].weight.fill_(2.5)
    heads.reset_parameters()
    assert all(bool(member[0].weight.eq(1).all()) for member in heads.members)


def test_reset_parameters_redraws_with_the_initialiser_the_heads_were_built_with():
    """Linear storage: construction and ``reset_parameters()`` both draw N(0, 0.01) weights and zero biases (RegNet's
    linear rule), not ``nn.Linear``'s uniform default; generic storage: the same initialiser, every layer. 4 heads of
    100 x 256: 6 standard errors of the standard deviation are 1.3 %; ``nn.Linear``'s std would be 0.036."""
    from mixshare_layers.adapters.inits import TORCHVISION_INITS

    reinit = TORCHVISION_INITS["regnet"]
    torch.manual_seed(0)
    heads = MultiHead.from_module(nn.Linear(256, 100), 4, copy_weights=False, reinit=reinit)
    drawn = heads.weight.detach().clone()
    assert _std_within(drawn, 0.01) and not heads.bias.detach().any()
    with torch.no_grad():
        heads.weight.fill_(3.0)
        heads.bias.fill_(1.0)
    heads.reset_parameters()
    assert _std_within(heads.weight, 0.01) and not heads.bias.detach().any()
    assert not torch.equal(heads.weight.detach(), drawn) and not torch.equal(heads.weight[0], heads.weight[1])
    # pretrained heads (copies of the classifier) are redrawn by the same initialiser too
    copied = MultiHead.from_module(nn.Linear(256, 100), 4, reinit=reinit)
    copied.reset_parameters()
    assert _std_within(copied.weight, 0.01) and not copied.bias.detach().any()
    # generic heads: the same initialiser on every member, norm included
    mlp = nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 100))
    generic = MultiHead.from_module(mlp, 4, copy_weights=False, reinit=reinit)
    with torch.no_grad():
        for member in generic.members:
            member[0].weight.fill_(2.5)
            member[1].weight.fill_(2.5)
    generic.reset_parameters()
    assert _std_within(torch.stack([m[1].weight for m in generic.members]), 0.01)
    assert all(bool(m[0].weight.eq(1).all()) and not m[1].bias.any() for m in generic.members)
    # the initialiser travels with the heads (a copy, a pickle)
    for other in (copy.deepcopy(heads), pickle.loads(pickle.dumps(heads))):
        other.reset_parameters()
        assert _std_within(other.weight, 0.01)
