"""The Triton kernels registered as ``torch.library`` custom ops, with autograd and fake implementations.

* ``mixshare::mix(encodings, boxes, inside, outside, native_h, native_w, scale) -> mixed``: ``(B, M, C, H, W)`` ->
  ``(B, C, H, W)`` in the encodings' dtype. Backward: ``mixshare::mix_backward``, which reads the output gradient
  once and writes the ``(B, M, C, H, W)`` gradient once. The boxes and compositions get no gradient (they describe
  a random draw, nothing learnable).
* ``mixshare::unmix_pool(features, boxes, inside, outside, strength, native_h, native_w, num_unmixed, normalize)
  -> pooled``: ``(B, C, h, w)`` -> ``(B, M, C)`` in the features' dtype: the M members' masked averages (or sums over
  ``h w``) through their (faded) masks, from two sums accumulated in float32 (float64 for float64 features); channels
  from ``num_unmixed`` on get the plain average. ``strength`` is an optional 0-dim tensor. Backward:
  ``mixshare::unmix_pool_backward`` writes the feature gradient ``g_all + g_box * cov`` once.
* :func:`finish_mix` (no autograd): the boxes and compositions of a mix from its random draws, in one launch.

Only the ``torch.library.custom_op`` / ``register_autograd`` / ``register_fake`` API of torch 2.4 is used.

In eager mode, :func:`mix_eager` / :func:`unmix_pool_eager` launch the same kernels through plain autograd Functions,
skipping the custom-op dispatch layers (host time that dominates at small sizes); under ``torch.compile`` the custom
ops are used, so the compiler sees one opaque op with registered fake and backward implementations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import kernels

__all__ = [
    "finish_mix",
    "launch_mix",
    "launch_mix_backward",
    "launch_unmix_pool",
    "launch_unmix_pool_backward",
    "mix",
    "mix_eager",
    "unmix_pool",
    "unmix_pool_eager",
]

# elements per program tile and warps per program, per kernel family (benchmarks/run.py sweeps them on a GPU)
_MIX_TILE, _MIX_WARPS = 2048, 4
_UNMIX_TILE, _UNMIX_WARPS = 4096, 4  # the forward (a reduction)
_UNMIX_BWD_TILE, _UNMIX_BWD_WARPS = 2048, 4  # the backward (a broadcast write)


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _map_blocks(h: int, w: int, tile: int) -> tuple[int, int]:
    """(BLOCK_Y, BLOCK_X): whole rows (padded to a power of two), as many as fit in a tile."""
    block_x = triton.next_power_of_2(w)
    block_y = max(1, min(triton.next_power_of_2(h), tile // block_x))
    return block_y, block_x


def _unmix_blocks(c: int, h: int, w: int, tile: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_Y, BLOCK_X) of the unmix kernels: a map tile, then channels up to the tile size."""
    block_y, block_x = _map_blocks(h, w, tile)
    block_c = max(1, min(triton.next_power_of_2(c), tile // (block_y * block_x)))
    return block_c, block_y, block_x


# -- launchers (write into a given output; the tests poison it with NaN first) -----------------------------------
def launch_mix(
    encodings: Tensor,
    boxes: Tensor,
    inside: Tensor,
    outside: Tensor,
    native_h: int,
    native_w: int,
    scale: float,
    out: Tensor,
) -> Tensor:
    """Fill the contiguous ``out`` ``(B, C, H, W)`` with the mix of ``encodings`` ``(B, M, C, H, W)`` (any strides)."""
    b, m, c, h, w = encodings.shape
    if out.numel() == 0:
        return out
    boxes = boxes.contiguous()
    inside = inside.contiguous()
    outside = outside.contiguous()
    _, acc = _acc(encodings.dtype)
    s = encodings.stride()
    block_y, block_x = _map_blocks(h, w, _MIX_TILE)
    grid = (b * c, triton.cdiv(h, block_y))
    kernels.mix_fwd_kernel[grid](
        encodings, boxes, inside, outside, out,
        c, h, w, native_h, native_w, float(scale),
        s[0], s[1], s[2], s[3], s[4],
        M=m, BLOCK_Y=block_y, BLOCK_X=block_x, ACC=acc, num_warps=_MIX_WARPS,
    )  # fmt: skip
    return out


def launch_mix_backward(
    grad: Tensor,
    boxes: Tensor,
    inside: Tensor,
    outside: Tensor,
    native_h: int,
    native_w: int,
    scale: float,
    out: Tensor,
) -> Tensor:
    """Fill the contiguous ``out`` ``(B, M, C, H, W)`` with ``scale * m_i * grad`` (``grad`` any strides)."""
    b, c, h, w = grad.shape
    m = inside.shape[1]
    if out.numel() == 0:
        return out
    _, acc = _acc(grad.dtype)
    s = grad.stride()
    block_y, block_x = _map_blocks(h, w, _MIX_TILE)
    grid = (b * c, triton.cdiv(h, block_y))
    kernels.mix_bwd_kernel[grid](
        grad, boxes.contiguous(), inside.contiguous(), outside.contiguous(), out,
        c, h, w, native_h, native_w, float(scale),
        s[0], s[1], s[2], s[3],
        M=m, BLOCK_Y=block_y, BLOCK_X=block_x, ACC=acc, num_warps=_MIX_WARPS,
    )  # fmt: skip
    return out


# -- mixing ------------------------------------------------------------------------------------------------------
def _mix_new(encodings, boxes, inside, outside, native_h, native_w, scale):
    b, _, c, h, w = encodings.shape
    out = torch.empty((b, c, h, w), device=encodings.device, dtype=encodings.dtype)
    return launch_mix(encodings, boxes, inside, outside, native_h, native_w, scale, out)


def _mix_grad_new(grad, boxes, inside, outside, native_h, native_w, scale):
    b, c, h, w = grad.shape
    out = torch.empty((b, inside.shape[1], c, h, w), device=grad.device, dtype=grad.dtype)
    return launch_mix_backward(grad, boxes, inside, outside, native_h, native_w, scale, out)


@torch.library.custom_op("mixshare::mix", mutates_args=())
def mix(
    encodings: Tensor, boxes: Tensor, inside: Tensor, outside: Tensor, native_h: int, native_w: int, scale: float
) -> Tensor:
    return _mix_new(encodings, boxes, inside, outside, native_h, native_w, scale)


@mix.register_fake
def _(encodings, boxes, inside, outside, native_h, native_w, scale):
    b, _, c, h, w = encodings.shape
    return encodings.new_empty((b, c, h, w))


@torch.library.custom_op("mixshare::mix_backward", mutates_args=())
def mix_backward(
    grad: Tensor, boxes: Tensor, inside: Tensor, outside: Tensor, native_h: int, native_w: int, scale: float
) -> Tensor:
    return _mix_grad_new(grad, boxes, inside, outside, native_h, native_w, scale)


@mix_backward.register_fake
def _(grad, boxes, inside, outside, native_h, native_w, scale):
    b, c, h, w = grad.shape
    return grad.new_empty((b, inside.shape[1], c, h, w))


def _mix_setup(ctx, inputs, output) -> None:
    _, boxes, inside, outside, native_h, native_w, scale = inputs
    ctx.save_for_backward(boxes, inside, outside)
    ctx.native = (native_h, native_w, scale)
    ctx.enc_dtype = inputs[0].dtype


def _mix_bwd(ctx, grad, op=None):
    boxes, inside, outside = ctx.saved_tensors
    native_h, native_w, scale = ctx.native
    grad_e = (op or mix_backward)(grad.to(ctx.enc_dtype), boxes, inside, outside, native_h, native_w, scale)
    return grad_e, None, None, None, None, None, None


mix.register_autograd(_mix_bwd, setup_context=_mix_setup)


# -- fused unmix + pool ------------------------------------------------------------------------------------------
def launch_unmix_pool(
    features: Tensor,
    boxes: Tensor,
    inside: Tensor,
    outside: Tensor,
    strength: Tensor | None,
    native_h: int,
    native_w: int,
    num_unmixed: int,
    normalize: bool,
    out: Tensor,
) -> Tensor:
    """Fill ``out`` ``(B, M, C)`` with the per-member masked pooling of ``features`` ``(B, C, h, w)`` (any strides).

    ``strength`` is a 0-dim tensor (fadeout) or ``None`` (no fading); channels from ``num_unmixed`` on get the plain
    average.
    """
    b, c, h, w = features.shape
    m = inside.shape[1]
    if out.numel() == 0:
        return out
    _, acc = _acc(features.dtype)
    block_c, block_y, block_x = _unmix_blocks(c, h, w, _UNMIX_TILE)
    s = features.stride()
    grid = (b, triton.cdiv(c, block_c))
    kernels.unmix_pool_fwd_kernel[grid](
        features, boxes.contiguous(), inside.contiguous(), outside.contiguous(),
        boxes if strength is None else strength, out,
        c, h, w, native_h, native_w, num_unmixed,
        s[0], s[1], s[2], s[3],
        M=m, HAS_R=strength is not None, NORMALIZE=bool(normalize),
        BLOCK_C=block_c, BLOCK_Y=block_y, BLOCK_X=block_x, ACC=acc, num_warps=_UNMIX_WARPS,
    )  # fmt: skip
    return out


def launch_unmix_pool_backward(
    grad: Tensor,
    boxes: Tensor,
    inside: Tensor,
    outside: Tensor,
    strength: Tensor | None,
    native_h: int,
    native_w: int,
    num_unmixed: int,
    normalize: bool,
    out: Tensor,
) -> Tensor:
    """Fill the contiguous ``out`` ``(B, C, h, w)`` with the feature gradient of :func:`launch_unmix_pool`."""
    b, c, h, w = out.shape
    m = inside.shape[1]
    if out.numel() == 0:
        return out
    _, acc = _acc(out.dtype)
    block_c, block_y, block_x = _unmix_blocks(c, h, w, _UNMIX_BWD_TILE)
    grid = (b, triton.cdiv(c, block_c), triton.cdiv(h, block_y))
    kernels.unmix_pool_bwd_kernel[grid](
        grad.contiguous(), boxes.contiguous(), inside.contiguous(), outside.contiguous(),
        boxes if strength is None else strength, out,
        c, h, w, native_h, native_w, num_unmixed,
        M=m, HAS_R=strength is not None, NORMALIZE=bool(normalize),
        BLOCK_C=block_c, BLOCK_Y=block_y, BLOCK_X=block_x, ACC=acc, num_warps=_UNMIX_BWD_WARPS,
    )  # fmt: skip
    return out


def _pool_new(features, boxes, inside, outside, strength, native_h, native_w, num_unmixed, normalize):
    b, c, _, _ = features.shape
    out = torch.empty((b, inside.shape[1], c), device=features.device, dtype=features.dtype)
    return launch_unmix_pool(features, boxes, inside, outside, strength, native_h, native_w, num_unmixed, normalize,
                             out)  # fmt: skip


def _pool_grad_new(grad, boxes, inside, outside, strength, native_h, native_w, num_unmixed, normalize, h, w, dtype):
    b, _, c = grad.shape
    out = torch.empty((b, c, h, w), device=grad.device, dtype=dtype)
    return launch_unmix_pool_backward(grad, boxes, inside, outside, strength, native_h, native_w, num_unmixed,
                                      normalize, out)  # fmt: skip


@torch.library.custom_op("mixshare::unmix_pool", mutates_args=())
def unmix_pool(
    features: Tensor,
    boxes: Tensor,
    inside: Tensor,
    outside: Tensor,
    strength: Tensor | None,
    native_h: int,
    native_w: int,
    num_unmixed: int,
    normalize: bool,
) -> Tensor:
    return _pool_new(features, boxes, inside, outside, strength, native_h, native_w, num_unmixed, normalize)


@unmix_pool.register_fake
def _(features, boxes, inside, outside, strength, native_h, native_w, num_unmixed, normalize):
    b, c, _, _ = features.shape
    return features.new_empty((b, inside.shape[1], c))


@torch.library.custom_op("mixshare::unmix_pool_backward", mutates_args=())
def unmix_pool_backward(
    grad: Tensor,
    boxes: Tensor,
    inside: Tensor,
    outside: Tensor,
    strength: Tensor | None,
    native_h: int,
    native_w: int,
    num_unmixed: int,
    normalize: bool,
    h: int,
    w: int,
    dtype: torch.dtype,
) -> Tensor:
    return _pool_grad_new(grad, boxes, inside, outside, strength, native_h, native_w, num_unmixed, normalize, h, w,
                          dtype)  # fmt: skip


@unmix_pool_backward.register_fake
def _(grad, boxes, inside, outside, strength, native_h, native_w, num_unmixed, normalize, h, w, dtype):
    b, _, c = grad.shape
    return grad.new_empty((b, c, h, w), dtype=dtype)


def _pool_setup(ctx, inputs, output) -> None:
    features, boxes, inside, outside, strength, native_h, native_w, num_unmixed, normalize = inputs
    ctx.save_for_backward(boxes, inside, outside, strength)
    ctx.geometry = (native_h, native_w, num_unmixed, normalize, features.shape[2], features.shape[3], features.dtype)


def _pool_bwd(ctx, grad, op=None):
    boxes, inside, outside, strength = ctx.saved_tensors
    native_h, native_w, num_unmixed, normalize, h, w, dtype = ctx.geometry
    grad_f = (op or unmix_pool_backward)(grad, boxes, inside, outside, strength, native_h, native_w, num_unmixed,
                                         normalize, h, w, dtype)  # fmt: skip
    return grad_f, None, None, None, None, None, None, None, None


unmix_pool.register_autograd(_pool_bwd, setup_context=_pool_setup)


# -- eager entry points ------------------------------------------------------------------------------------------
# The custom ops above are what torch.compile and torch.export see. In eager mode their dispatch (schema parsing,
# fake/autograd registration layers) costs tens of microseconds of host time per call, which at small sizes is more
# than the kernel itself; these autograd Functions run the same allocating launchers and the same setup/backward
# code as the custom ops, without the dispatch.
class _MixEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        _mix_setup(ctx, inputs, None)
        return _mix_new(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _mix_bwd(ctx, grad, op=_mix_grad_new)


class _UnmixPoolEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        _pool_setup(ctx, inputs, None)
        return _pool_new(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _pool_bwd(ctx, grad, op=_pool_grad_new)


def unmix_pool_eager(
    features: Tensor,
    boxes: Tensor,
    inside: Tensor,
    outside: Tensor,
    strength: Tensor | None,
    native_h: int,
    native_w: int,
    num_unmixed: int,
    normalize: bool,
) -> Tensor:
    """:func:`unmix_pool` without the custom-op dispatch (eager mode only; same kernels, same gradient)."""
    return _UnmixPoolEager.apply(features, boxes, inside, outside, strength, native_h, native_w, num_unmixed,
                                 normalize)  # fmt: skip


def mix_eager(
    encodings: Tensor, boxes: Tensor, inside: Tensor, outside: Tensor, native_h: int, native_w: int, scale: float
) -> Tensor:
    """:func:`mix` without the custom-op dispatch (eager mode only; same kernels, same gradient)."""
    return _MixEager.apply(encodings, boxes, inside, outside, native_h, native_w, scale)


# -- sampling ----------------------------------------------------------------------------------------------------
def finish_mix(
    lam: Tensor,
    owner: Tensor,
    pixel: Tensor,
    coin: Tensor,
    cutmix_prob: Tensor | float,
    height: int,
    width: int,
    dtype: torch.dtype,
):
    """:func:`~mixshare_layers.functional.mixing.finish_mix_reference` in one kernel launch (no autograd: draws)."""
    from ...mix_info import MixInfo

    b, m = lam.shape
    dev = lam.device
    boxes = torch.empty((b, 4), device=dev, dtype=torch.long)
    inside = torch.empty((b, m), device=dev, dtype=dtype)
    outside = torch.empty((b, m), device=dev, dtype=dtype)
    ratios = torch.empty((b, m), device=dev, dtype=dtype)
    cut = torch.empty((), device=dev, dtype=torch.bool)
    in_memory = isinstance(cutmix_prob, Tensor)
    # a tensor probability is compared in its own dtype; a float one is passed by value (then coin is an unused pointer)
    prob_tensor = cutmix_prob.to(dev) if isinstance(cutmix_prob, Tensor) else coin
    block_b = min(triton.next_power_of_2(max(b, 1)), 128)
    _, work = _acc(lam.dtype)
    kernels.finish_mix_kernel[(triton.cdiv(b, block_b),)](
        lam.contiguous(), owner, pixel.contiguous(), coin, prob_tensor, 0.0 if in_memory else float(cutmix_prob),
        boxes, inside, outside, ratios, cut,
        b, height, width,
        M=m, BLOCK_B=block_b, BLOCK_M=triton.next_power_of_2(m), PROB_IN_MEMORY=in_memory, WORK=work,
    )  # fmt: skip
    return MixInfo(boxes=boxes, inside=inside, outside=outside, ratios=ratios, cutmix=cut, height=height, width=width)
