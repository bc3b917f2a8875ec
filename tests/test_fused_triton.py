"""Triton kernels vs the float64 torch reference, forward and backward.

These tests run on CUDA when it is available, or on the CPU under ``TRITON_INTERPRET=1`` (the variable must be set
before triton is imported, so ``tests/test_fused.py`` runs this file in a subprocess with it). Otherwise they skip.
Every kernel writes into an output first filled with NaN, so an element it fails to write fails the test.
"""

from __future__ import annotations

import os

import pytest
import torch

from mixshare_layers import CutMixMixer, MixInfo, Unmixer
from mixshare_layers.functional import mix, mix_reference, sample_mix_params, unmix_pool, unmix_pool_reference
from mixshare_layers.functional.random import sample_dirichlet

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None

pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="needs CUDA, or TRITON_INTERPRET=1 (run by tests/test_fused.py in a subprocess)"
)


@pytest.fixture(scope="module")
def ops():
    pytest.importorskip("triton")
    from mixshare_layers.functional.backend import triton_ops

    return triton_ops()


def make_info(batch: int, m: int, height: int, width: int, kind: str, seed: int) -> MixInfo:
    """A mix with boxes of a chosen kind: random CutMix, empty, full map, touching borders, or linear."""
    g = torch.Generator().manual_seed(seed)
    info = sample_mix_params(batch, m, height, width, cutmix_prob=1.0, dtype=torch.float64, generator=g)
    inside = torch.rand(batch, m, dtype=torch.float64, generator=g)  # arbitrary compositions: not only one-hot
    outside = torch.rand(batch, m, dtype=torch.float64, generator=g)
    boxes = info.boxes.clone()
    if kind == "empty":
        boxes[:, 1] = boxes[:, 0]  # y1 == y0
    elif kind == "full":
        boxes = torch.tensor([[0, height, 0, width]] * batch)
    elif kind == "border":
        boxes = torch.tensor([[0, max(1, height // 2), width // 3, width]] * batch)
        boxes[-1] = torch.tensor([height // 2, height, 0, 1])
    elif kind == "linear":
        boxes.zero_()
    info = info._replace(boxes=boxes, inside=inside, outside=outside)
    return info.to(DEVICE)


# (B, M, C, H, W, kind): sizes off the tile sizes (rows padded to a power of two, 2048-element tiles), several row
# blocks per map (33 x 35: two blocks of 32 rows), and maps smaller than one tile
MIX_CASES = [
    (1, 1, 3, 5, 7, "random"),
    (2, 2, 3, 33, 35, "random"),
    (3, 3, 2, 9, 11, "border"),
    (2, 4, 2, 7, 5, "empty"),
    (1, 2, 1, 31, 33, "full"),
    (2, 3, 3, 4, 6, "linear"),
]


@pytest.mark.parametrize(("b", "m", "c", "h", "w", "kind"), MIX_CASES)
def test_mix_kernels_match_reference(ops, b, m, c, h, w, kind):
    info = make_info(b, m, h, w, kind, seed=b * 100 + m * 10 + c)
    e = torch.randn(b, m, c, h, w, dtype=torch.float64, device=DEVICE)
    scale = float(m)
    want = mix_reference(e, info, scale)
    out = torch.full((b, c, h, w), float("nan"), dtype=torch.float64, device=DEVICE)
    ops.launch_mix(e, info.boxes, info.inside, info.outside, h, w, scale, out)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)

    grad = torch.randn(b, c, h, w, dtype=torch.float64, device=DEVICE)
    e_req = e.clone().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(mix_reference(e_req, info, scale), e_req, grad)
    grad_e = torch.full((b, m, c, h, w), float("nan"), dtype=torch.float64, device=DEVICE)
    ops.launch_mix_backward(grad, info.boxes, info.inside, info.outside, h, w, scale, grad_e)
    torch.testing.assert_close(grad_e, want_grad, rtol=1e-12, atol=1e-12)


# (B, C, h, w, native H, W, kind): fractional coverage when the map is coarser than the boxes' grid
UNMIX_CASES = [
    (1, 3, 4, 4, 16, 16, "random"),
    (2, 5, 17, 19, 17, 19, "random"),
    (3, 37, 3, 5, 7, 9, "border"),
    (2, 4, 1, 1, 8, 8, "random"),
    (2, 70, 8, 8, 32, 32, "empty"),
    (1, 6, 5, 3, 10, 9, "full"),
    (1, 3, 45, 40, 45, 40, "border"),  # larger than one tile: the forward loops over two row blocks
]


# the fused pooling: every mode of Unmixer (full, fadeout with a tensor or a float strength, partial, sum pooling)
POOL_MODES = [
    (0.0, None, True),
    ("tensor", None, True),
    (0.35, None, True),
    (0.0, 3, True),
    ("tensor", 2, False),
    (0.0, None, False),
]


@pytest.mark.parametrize(("strength", "num_unmixed", "normalize"), POOL_MODES)
@pytest.mark.parametrize(("b", "c", "h", "w", "nh", "nw", "kind"), UNMIX_CASES)
def test_unmix_pool_kernels_match_reference(ops, b, c, h, w, nh, nw, kind, strength, num_unmixed, normalize):
    info = make_info(b, 3, nh, nw, kind, seed=b * 10 + c)
    if kind == "empty":  # a member owning the empty box alone: zero mask mass at every resolution
        info = info._replace(inside=torch.eye(3, dtype=torch.float64, device=DEVICE)[torch.zeros(b, dtype=torch.long)])
        info = info._replace(outside=1 - info.inside)
    k = num_unmixed if num_unmixed is None else min(num_unmixed, c)
    r = torch.tensor(0.6, dtype=torch.float64, device=DEVICE) if strength == "tensor" else strength
    f = torch.randn(b, c, h, w, dtype=torch.float64, device=DEVICE, requires_grad=True)
    kw = {"num_unmixed": k, "normalize": normalize}
    want = unmix_pool_reference(f, info, strength=float(r), **kw)
    got = unmix_pool(f, info, strength=r, backend="triton", **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad(want, f, grad)
    (got_grad,) = torch.autograd.grad(got, f, grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-11, atol=1e-12)

    # the raw launchers write every element (outputs poisoned first)
    r_t = r if isinstance(r, torch.Tensor) else None
    inside, outside = (info.inside, info.outside) if r_t is not None else (info.faded(r).inside, info.faded(r).outside)
    pooled = torch.full((b, 3, c), float("nan"), dtype=torch.float64, device=DEVICE)
    ops.launch_unmix_pool(f.detach(), info.boxes, inside, outside, r_t, nh, nw, c if k is None else k, normalize,
                          pooled)  # fmt: skip
    torch.testing.assert_close(pooled, want.detach(), rtol=1e-12, atol=1e-12)
    grad_f = torch.full((b, c, h, w), float("nan"), dtype=torch.float64, device=DEVICE)
    ops.launch_unmix_pool_backward(grad, info.boxes, inside, outside, r_t, nh, nw, c if k is None else k, normalize,
                                   grad_f)  # fmt: skip
    torch.testing.assert_close(grad_f, want_grad, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_public_ops_match_reference_with_autograd(ops, layout, m):
    b, c, h, w = 2, 3, 9, 7
    info = make_info(b, m, h, w, "random", seed=m)
    e = torch.randn(b, m, c, h, w, dtype=torch.float64, device=DEVICE)
    f = torch.randn(b, 5, 5, 3, dtype=torch.float64, device=DEVICE)
    if layout == "channels_last":
        e = e.reshape(b * m, c, h, w).contiguous(memory_format=torch.channels_last).view(b, m, c, h, w)
        f = f.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        e = e.transpose(-1, -2).contiguous().transpose(-1, -2)  # a strided view with the same values
        f = f.transpose(-1, -2).contiguous().transpose(-1, -2)
    e.requires_grad_(True)
    f.requires_grad_(True)

    out = mix(e, info, backend="triton")
    ref = mix_reference(e, info)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(
        torch.autograd.grad(out, e, grad)[0], torch.autograd.grad(ref, e, grad)[0], rtol=1e-12, atol=1e-12
    )

    kw = {"strength": 0.25, "num_unmixed": 3}
    pooled = unmix_pool(f, info, backend="triton", **kw)
    ref = unmix_pool_reference(f, info, **kw)
    torch.testing.assert_close(pooled, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(
        torch.autograd.grad(pooled, f, grad)[0], torch.autograd.grad(ref, f, grad)[0], rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(("layout", "prefix"), [("tokens", 0), ("tokens", 2), ("channels_last", 0)])
def test_modules_on_token_and_channels_last_features(ops, layout, prefix):
    """The kernels read a token grid / channels-last map through its strides (no copy): same pooling and gradient
    as the torch path on the same layout."""
    b, c, h, w = 2, 5, 3, 4
    info = make_info(b, 2, 6, 8, "random", seed=3)
    shape = (b, prefix + h * w, c) if layout == "tokens" else (b, h, w, c)
    f = torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fused = Unmixer("fadeout", layout=layout, num_prefix_tokens=prefix, backend="triton").train()
    plain = Unmixer("fadeout", layout=layout, num_prefix_tokens=prefix, backend="torch").train()
    out, ref = fused(f, info, 0.1), plain(f, info, 0.1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(
        torch.autograd.grad(out, f, grad)[0], torch.autograd.grad(ref, f, grad)[0], rtol=1e-12, atol=1e-12
    )
    enc = torch.randn(b, 2, 6, 8, c, dtype=torch.float64, device=DEVICE)  # channels-last encodings
    mixed = CutMixMixer(2, layout="channels_last", backend="triton").apply(enc, info)
    torch.testing.assert_close(mixed.permute(0, 3, 1, 2), mix_reference(enc.permute(0, 1, 4, 2, 3), info))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_outputs_and_fp32_accumulation(ops, dtype):
    b, m, c, h, w = 2, 3, 4, 8, 8
    info = make_info(b, m, h, w, "random", seed=7).to(dtype=torch.float32)
    e = torch.randn(b, m, c, h, w, device=DEVICE).to(dtype)
    out = mix(e, info, backend="triton")
    assert out.dtype == dtype
    ref = mix_reference(e.double(), info.to(dtype=torch.float64))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)  # one rounding at the end only

    f = torch.randn(b, 6, 4, 4, device=DEVICE).to(dtype).requires_grad_(True)
    pooled = unmix_pool(f, info, backend="triton")
    assert pooled.dtype == dtype
    torch.testing.assert_close(pooled.double(), unmix_pool_reference(f.double(), info.to(dtype=torch.float64)),
                               rtol=tol, atol=tol)  # fmt: skip
    pooled.float().sum().backward()
    assert f.grad is not None and f.grad.dtype == dtype


def test_opcheck(ops):
    info = make_info(2, 3, 6, 5, "random", seed=3).to(dtype=torch.float32)
    e = torch.randn(2, 3, 4, 6, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.mixshare.mix.default, (e, info.boxes, info.inside, info.outside, 6, 5, 3.0))
    f = torch.randn(2, 4, 3, 3, device=DEVICE, requires_grad=True)
    r = torch.tensor(0.25, device=DEVICE)
    for strength, k, normalize in ((None, 4, True), (r, 2, False)):
        args = (f, info.boxes, info.inside, info.outside, strength, 6, 5, k, normalize)
        torch.library.opcheck(torch.ops.mixshare.unmix_pool.default, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"] if DEVICE == "cuda" else ["aot_eager"])
def test_compile_sees_the_custom_ops(ops, compiler):
    info = make_info(2, 2, 8, 8, "random", seed=5).to(dtype=torch.float32)
    mixer = CutMixMixer(2, backend="triton")
    unmixer = Unmixer("fadeout", backend="triton")

    def step(e):
        mixed = mixer.apply(e, info)
        return unmixer(mixed, info, 0.1).square().sum()

    e = torch.randn(2, 2, 3, 8, 8, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    got = compiled(e)
    (grad,) = torch.autograd.grad(got, e)
    e2 = e.detach().clone().requires_grad_(True)
    mixer.backend = unmixer.backend = "torch"  # the same modules on the reference path
    want = step(e2)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, e2.grad, rtol=1e-5, atol=1e-5)


# -- the sampler's kernel: the same MixInfo as the torch reference from the same draws -------------------------------
@pytest.mark.parametrize(
    ("b", "m", "h", "w", "prob", "dtype"),
    [
        (1, 2, 32, 32, 1.0, torch.float32),
        (37, 2, 7, 9, 0.5, torch.float32),
        (130, 3, 16, 12, "tensor", torch.float32),
        (5, 4, 5, 3, 0.0, torch.float64),
        (64, 2, 1, 1, 1.0, torch.float64),
    ],
)
def test_sampler_kernel_matches_torch_reference(ops, b, m, h, w, prob, dtype):
    from mixshare_layers.functional.mixing import finish_mix_reference

    work = torch.float64 if dtype == torch.float64 else torch.float32
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        lam = sample_dirichlet(2.0, b, m, dtype=work, generator=g)
        lam[0, 1:] = 0.0  # a row whose others all underflowed: they share the outside uniformly
        lam[0, 0] = 1.0
        owner = torch.randint(m, (1,), generator=g)
        pixel = torch.randint(h * w, (b,), generator=g)
        coin = torch.rand((), generator=g)
        p = torch.rand((), generator=g) if prob == "tensor" else prob
        args = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in (lam, owner, pixel, coin, p)]
        want = finish_mix_reference(*args, h, w, dtype)
        got = ops.finish_mix(*args, h, w, dtype)
        assert torch.equal(got.boxes, want.boxes)
        assert bool(got.cutmix) == bool(want.cutmix) and got.cutmix.shape == () and got.cutmix.dtype == torch.bool
        tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 1e-15}
        for name in ("inside", "outside", "ratios"):
            assert getattr(got, name).dtype == dtype
            torch.testing.assert_close(getattr(got, name), getattr(want, name), **tol)
        assert (got.height, got.width) == (h, w)


def test_sample_mix_params_backends_draw_the_same_mix():
    """With one generator state, the torch and Triton backends consume the same draws and return the same MixInfo."""
    kw = {"device": DEVICE, "cutmix_prob": 0.7, "alpha": 1.0}
    for seed in range(6):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        want = sample_mix_params(33, 3, 11, 13, generator=g, backend="torch", **kw)
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        got = sample_mix_params(33, 3, 11, 13, generator=g, backend="triton", **kw)
        assert torch.equal(got.boxes, want.boxes) and bool(got.cutmix) == bool(want.cutmix)
        torch.testing.assert_close(got.ratios, want.ratios, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.inside, want.inside, rtol=1e-6, atol=1e-7)
