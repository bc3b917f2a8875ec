"""Unmixing: per-subnetwork masked pooling of the final feature maps, without materialising M masked copies.

With the separable box coverage ``cov(y, x) = cov_y(y) cov_x(x)`` (see :class:`~mixshare_layers.MixInfo`), the
masked sum of member ``i`` splits into two per-channel sums that every member shares:

    sum_p m_i(p) f(p) = inside_i * S_box + outside_i * (S_all - S_box)
    S_all = sum_p f(p),    S_box = sum_{y, x} cov_y(y) cov_x(x) f(y, x)

and its mask mass is ``inside_i * A + outside_i * (h w - A)`` with ``A = sum cov``. So the cost is two reductions of
the feature map, whatever M is, and memory is ``O(B C)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_ndim, check_num_subnetworks
from ..mix_info import MixInfo, check_mix_info
from .backend import resolve_backend, triton_ops, use_triton

__all__ = ["global_pool", "unmix_pool", "unmix_pool_reference"]


def global_pool(features: Tensor, num_subnetworks: int) -> Tensor:
    """Plain global average pooling shared by every subnetwork: ``(B, C, h, w) -> (B, M, C)`` (an expanded view).

    Args:
        features: final feature maps.
        num_subnetworks: M.

    Shape:
        - Input: ``(B, C, h, w)``.
        - Output: ``(B, M, C)``, the same vector for every member (no copy).

    Example:
        >>> global_pool(torch.ones(2, 5, 4, 4), 3).shape
        torch.Size([2, 3, 5])
    """
    check_ndim("features", features, 4, "(B, C, h, w)")
    return _global_pool(features, check_num_subnetworks(num_subnetworks))


def _global_pool(features: Tensor, num_subnetworks: int) -> Tensor:
    """:func:`global_pool` of arguments already checked."""
    return features.mean(dim=(2, 3)).unsqueeze(1).expand(-1, num_subnetworks, -1)


def _check_unmix_inputs(features: Tensor, info: MixInfo, num_unmixed: int | None) -> None:
    check_ndim("features", features, 4, "(B, C, h, w)")
    check_mix_info("info", info)
    if features.shape[0] != info.inside.shape[0]:
        raise ValueError(
            f"features have batch size {features.shape[0]} (shape {tuple(features.shape)}) but the MixInfo "
            f"describes {info.inside.shape[0]} samples; they must come from the same batch"
        )
    if num_unmixed is not None and not 0 <= num_unmixed <= features.shape[1]:
        raise ValueError(f"num_unmixed must be in [0, C={features.shape[1]}], but got {num_unmixed}")


def _channels_last_rows(features: Tensor) -> Tensor | None:
    """``(B, h w, C)`` view of a ``(B, C, h, w)`` map whose channels are innermost (a permuted channels-last map or
    the patch grid of a token sequence), or ``None`` when the strides do not allow one without a copy."""
    b, c, h, w = features.shape
    sb, sc, sh, sw = features.stride()
    if (c == 1 or sc == 1) and (w == 1 or sw == c) and (h == 1 or sh == w * c):
        return features.as_strided((b, h * w, c), (sb, c, 1))
    return None


class _UnmixSumsTorch(torch.autograd.Function):
    """``S_all = sum_p f`` and ``S_box = sum_{y,x} cov_y(y) cov_x(x) f`` per ``(b, c)``, in the coverage dtype.

    Forward: one plain sum and one batched matrix-vector product against the ``(B, h w)`` coverage, on the map as it
    is laid out (``(B, C, h w)`` rows for a channels-first map, ``(B, h w, C)`` for channels-innermost strides: a
    channels-last map or a token grid), so neither layout is copied. Backward: ``grad_f = g_all + g_box * cov``
    written once, in the features' dtype and in the same layout.
    """

    @staticmethod
    def forward(ctx, features: Tensor, cov_y: Tensor, cov_x: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(cov_y, cov_x)
        ctx.feat_dtype = features.dtype
        acc = cov_y.dtype
        b, c, h, w = features.shape
        f = features if features.dtype == acc else features.to(acc)
        s_all = f.sum(dim=(2, 3))
        cov = (cov_y[:, :, None] * cov_x[:, None, :]).reshape(b, 1, h * w)  # (B, 1, hw): small
        rows = _channels_last_rows(f) if f.stride(1) == 1 and c > 1 else None
        ctx.channels_last = rows is not None
        if rows is not None:  # (B, 1, hw) @ (B, hw, C)
            s_box = torch.bmm(cov, rows).view(b, c)
        else:
            # one matrix-vector product per sample (a (B, 1, hw) -> (B, hw, 1) view: BLAS takes its fast path)
            s_box = torch.bmm(f.reshape(b, c, h * w), cov.transpose(1, 2)).view(b, c)
        return s_all, s_box

    @staticmethod
    def backward(ctx, grad_all: Tensor, grad_box: Tensor) -> tuple[Tensor, None, None]:
        cov_y, cov_x = ctx.saved_tensors
        cov = cov_y[:, :, None] * cov_x[:, None, :]  # (B, h, w)
        if ctx.channels_last:  # written as (B, h, w, C), returned as its (B, C, h, w) view
            grad_f = torch.addcmul(grad_all[:, None, None, :], grad_box[:, None, None, :], cov[..., None])
            return grad_f.to(ctx.feat_dtype).permute(0, 3, 1, 2), None, None
        grad_f = torch.addcmul(grad_all[:, :, None, None], grad_box[:, :, None, None], cov[:, None])
        return grad_f.to(ctx.feat_dtype), None, None


def _pool_weights(info: MixInfo, strength: Tensor | float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Faded compositions ``(inside', outside')`` for ``m + r (1 - m)``."""
    inside = info.inside.to(dtype)
    outside = info.outside.to(dtype)
    if not isinstance(strength, Tensor):
        # a Python number stays one: no host-to-device copy (a synchronisation on CUDA), and none of the ops for 0
        value = float(strength)
        if value == 0.0:
            return inside, outside
        return inside + value * (1 - inside), outside + value * (1 - outside)
    r = strength.to(dtype=dtype, device=inside.device)
    return inside + r * (1 - inside), outside + r * (1 - outside)


def unmix_pool(
    features: Tensor,
    info: MixInfo,
    *,
    strength: Tensor | float = 0.0,
    num_unmixed: int | None = None,
    normalize: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Pool the final feature maps once per subnetwork through its (faded) mixing mask.

    Args:
        features: final feature maps ``(B, C, h, w)`` of the shared core.
        info: the mix used at the input; its masks are brought to ``h x w`` by exact area coverage.
        strength: fadeout strength ``r`` in [0, 1]: masks ``m + r (1 - m)``; 0 is full unmixing, 1 none.
            A float or a 0-dim tensor (kept on device).
        num_unmixed: unmix only the first ``num_unmixed`` channels (partial unmixing); the others get the plain
            global average. ``None`` unmixes every channel.
        normalize: ``True`` divides by each member's mask mass (masked *average*: a member covering the whole map
            gets exactly the global average, so train and test scales agree). ``False`` divides by ``h * w``
            (the plain masked sum of the paper's "filter then global-average-pool"). A member whose mask is empty
            at this resolution gets zeros with ``normalize=True``.

        backend: ``"auto"`` (Triton for CUDA tensors when it imports, else torch), ``"torch"`` or ``"triton"``;
            ``None`` reads ``MIXSHARE_BACKEND`` (see :mod:`mixshare_layers.functional.backend`). Either way the
            feature map is read twice at most (two sums), its gradient written once, and nothing of size
            ``M x (B, C, h, w)`` is allocated.

    Shape:
        - Output: ``(B, M, C)``. Accumulation is done in float32 at least (float64 for float64 features); the
          output has the features' dtype, and so does the gradient written back to ``features``. Any memory layout
          (channels_last, strided views) is accepted.

    Example:
        >>> from mixshare_layers.functional import sample_mix_params
        >>> info = sample_mix_params(4, 2, 32, 32, cutmix_prob=1.0, generator=torch.Generator().manual_seed(0))
        >>> features = torch.randn(4, 64, 8, 8)
        >>> unmix_pool(features, info).shape
        torch.Size([4, 2, 64])
        >>> no_unmixing = unmix_pool(features, info, strength=1.0)  # fadeout finished: the global average
        >>> torch.allclose(no_unmixing, features.mean(dim=(2, 3))[:, None].expand(-1, 2, -1))
        True
    """
    _check_unmix_inputs(features, info, num_unmixed)
    backend = resolve_backend(backend)
    return _unmix_pool(features, info, strength=strength, num_unmixed=num_unmixed, normalize=normalize, backend=backend)


def _unmix_pool(
    features: Tensor,
    info: MixInfo,
    *,
    strength: Tensor | float,
    num_unmixed: int | None,
    normalize: bool,
    backend: str,
) -> Tensor:
    """:func:`unmix_pool` of arguments already checked, ``backend`` resolved (what :class:`~mixshare_layers.Unmixer`
    calls)."""
    _, c, h, w = features.shape
    acc = torch.promote_types(features.dtype, torch.float32)
    if use_triton(backend, features):
        # one kernel for the whole pooling (the two sums and the M members' averages), one for its gradient
        ops = triton_ops()
        inside, outside, r = info.inside, info.outside, None
        if isinstance(strength, Tensor):
            r = strength.reshape(()).to(features.device)  # faded in the kernel (a tensor stays on the device)
        elif float(strength) != 0.0:
            inside, outside = _pool_weights(info, strength, acc)  # a Python number: faded here, in exact arithmetic
        fn = ops.unmix_pool if torch.compiler.is_compiling() else ops.unmix_pool_eager  # the custom op for compile
        k = c if num_unmixed is None else num_unmixed
        return fn(features, info.boxes, inside, outside, r, info.height, info.width, k, normalize)
    cov_y, cov_x = info.coverage_at(h, w, dtype=acc)  # (B, h), (B, w)
    if torch.compiler.is_compiling():
        # plain differentiable ops under torch.compile (see functional.mixing.mix for why)
        f = features.to(acc)
        s_all = f.sum(dim=(2, 3))
        s_box = torch.einsum("bchw,bh,bw->bc", f, cov_y, cov_x)
    else:
        s_all, s_box = _UnmixSumsTorch.apply(features, cov_y, cov_x)  # (B, C) each, in acc
    # the box's area in cells of the h x w grid, sum(cov): exact area coverage keeps it (y1-y0)(x1-x0) hw / (H W)
    extent = info.boxes[:, 1::2] - info.boxes[:, 0::2]  # (B, 2): box height and width on the native grid
    area = extent.prod(dim=1, dtype=acc) * (h * w / (info.height * info.width))  # (B,)
    inside, outside = _pool_weights(info, strength, acc)  # (B, M)
    num = inside[:, :, None] * s_box[:, None, :] + outside[:, :, None] * (s_all - s_box)[:, None, :]
    if normalize:
        mass = inside * area[:, None] + outside * (h * w - area[:, None])  # (B, M)
        positive = mass > 0
        pooled = torch.where(positive[:, :, None], num / torch.where(positive, mass, 1.0)[:, :, None], 0.0)
    else:
        pooled = num / (h * w)
    if num_unmixed is not None and num_unmixed < c:
        plain = (s_all / (h * w))[:, None, :].expand(-1, pooled.shape[1], -1)
        channel = torch.arange(c, device=features.device)
        pooled = torch.where(channel < num_unmixed, pooled, plain)
    return pooled.to(features.dtype)


def unmix_pool_reference(
    features: Tensor,
    info: MixInfo,
    *,
    strength: float = 0.0,
    num_unmixed: int | None = None,
    normalize: bool = True,
) -> Tensor:
    """Naive reference of :func:`unmix_pool` that materialises the M masked feature maps; for tests.

    Args:
        features: ``(B, C, h, w)``.
        info: the mix used at the input.
        strength: fadeout strength r in [0, 1].
        num_unmixed: unmix only the first ``num_unmixed`` channels (``None``: all).
        normalize: masked average (``True``) or masked sum over ``h * w``.

    Shape:
        - Output: ``(B, M, C)``.

    Example:
        >>> from mixshare_layers.functional import sample_mix_params
        >>> info = sample_mix_params(2, 3, 16, 16, cutmix_prob=1.0, generator=torch.Generator().manual_seed(0))
        >>> f = torch.randn(2, 8, 4, 4, dtype=torch.float64)
        >>> torch.allclose(unmix_pool(f, info, num_unmixed=2), unmix_pool_reference(f, info, num_unmixed=2))
        True
    """
    _check_unmix_inputs(features, info, num_unmixed)
    _, c, h, w = features.shape
    masks = info.faded(strength).masks_at(h, w, dtype=features.dtype)  # (B, M, h, w)
    if num_unmixed is not None:
        keep = torch.arange(c, device=features.device) < num_unmixed
        masks = torch.where(keep[None, None, :, None, None], masks[:, :, None], torch.ones_like(masks[:, :, None]))
    else:
        masks = masks[:, :, None]  # (B, M, 1 or C, h, w)
    filtered = masks * features[:, None]  # (B, M, C, h, w)
    total = filtered.sum(dim=(-2, -1))
    if not normalize:
        return total / (h * w)
    mass = masks.expand(-1, -1, c, -1, -1).sum(dim=(-2, -1))
    return torch.where(mass > 0, total / torch.where(mass > 0, mass, torch.ones_like(mass)), torch.zeros_like(total))
