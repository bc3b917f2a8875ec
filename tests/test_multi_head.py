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


def test_from_initializer_draws_each_head_independently():
    torch.manual_seed(0)
    lin = nn.Linear(64, 10).double()
    before = lin.weight.detach().clone()

    def he(module):
        nn.init.kaiming_normal_(module.weight)
        nn.init.zeros_(module.bias)

    heads = MultiHead.from_initializer(lin, 3, he)
    assert torch.equal(lin.weight, before)  # the template is not touched
    assert heads.weight.dtype == torch.float64 and heads.weight.shape == (3, 10, 64)
    assert not heads.bias.detach().any()
    assert not torch.equal(heads.weight[0], heads.weight[1]) and not torch.equal(heads.weight[1], heads.weight[2])
    assert abs(float(heads.weight.detach().std()) / (2 / 64) ** 0.5 - 1) < 0.05
    no_bias = MultiHead.from_initializer(nn.Linear(8, 2, bias=False), 2, lambda m: nn.init.ones_(m.weight))
    assert no_bias.bias is None and bool(no_bias.weight.eq(1).all())
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear, but got Conv2d"):
        MultiHead.from_initializer(nn.Conv2d(3, 3, 1), 2, he)
    with pytest.raises(TypeError, match="reinit must be callable, but got str"):
        MultiHead.from_initializer(lin, 2, "he")


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
    with pytest.raises(ValueError, match=r"input must have shape \(B, D=4\), but got \(2, 5\)"):
        heads(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"input must have shape \(B, M=2, D=4\), but got \(2, 3, 4\)"):
        heads(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"input must have shape \(B, D\) or \(B, M, D\)"):
        heads(torch.randn(2))
