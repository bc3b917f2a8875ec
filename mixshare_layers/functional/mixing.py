"""Sampling and applying MixMo's input mixing (CutMix and linear), as pure tensor functions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import check_int, check_ndim, check_real
from ..mix_info import MixInfo, check_mix_info
from .backend import resolve_backend, triton_ops, use_triton
from .random import generator_kwargs, sample_dirichlet

__all__ = ["cutmix_probability", "finish_mix_reference", "mix", "mix_reference", "sample_mix_params"]

# torch's native Dirichlet sampler is a private op: use it only where it exists
_NATIVE_DIRICHLET = hasattr(torch, "_sample_dirichlet")


def cutmix_probability(cutmix_prob: float, ramp: float, progress: Tensor | float) -> Tensor:
    """MixMo's schedule for the CutMix probability.

    ``cutmix_prob`` until ``1 - ramp`` of training, then linearly down to 0 at the end (``ramp = 1/12`` in MixMo;
    ``ramp = 0`` keeps it constant). Returns a 0-dim tensor (on ``progress``'s device if it is a tensor).

    Args:
        cutmix_prob: the probability before the ramp.
        ramp: the end fraction of training over which it falls to 0.
        progress: training progress in [0, 1] (a float or a 0-dim tensor).

    Example:
        >>> [round(float(cutmix_probability(0.5, 1 / 12, p)), 3) for p in (0.0, 11 / 12, 23 / 24, 1.0)]
        [0.5, 0.5, 0.25, 0.0]
    """
    p = torch.as_tensor(progress, dtype=torch.float32)
    if ramp <= 0:
        return torch.full_like(p, cutmix_prob)
    start = 1.0 - ramp
    factor = ((1.0 - p) / ramp).clamp(0.0, 1.0)
    return torch.where(p < start, torch.full_like(p, cutmix_prob), cutmix_prob * factor)


def sample_mix_params(
    batch_size: int,
    num_subnetworks: int,
    height: int,
    width: int,
    *,
    alpha: float = 2.0,
    cutmix_prob: float | Tensor = 0.5,
    shuffle_roles: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> MixInfo:
    """Draw one batch of MixMo mixes, fully vectorised and on ``device`` (no host synchronisation).

    Args:
        batch_size: B.
        num_subnetworks: M.
        height: H of the grid the boxes live on (the encoding's height).
        width: W of that grid.
        alpha: Dirichlet concentration of the mixing ratios (Beta(alpha, alpha) for M = 2); ``alpha <= 0`` gives
            exactly ``1 / M`` to every member.
        cutmix_prob: probability that this batch uses CutMix rather than linear mixing (float or 0-dim tensor).
        shuffle_roles: draw which member owns the box, once per batch (else member 0 always owns it).
        device: device of the draw.
        dtype: floating dtype of the compositions and ratios.
        generator: optional ``torch.Generator`` (on ``device``) to make the draw replayable.
        backend: ``"auto"`` (on CUDA, the boxes and compositions are computed from the draws by one Triton kernel
            when Triton imports), ``"torch"`` or ``"triton"``; ``None`` reads ``MIXSHARE_BACKEND``. Both compute the
            same :class:`MixInfo` from the same draws.

    Returns:
        A :class:`MixInfo`. With CutMix the owner ``o`` gets a box of side ``floor(S * sqrt(λ_o))`` centred at a
        uniform pixel and clipped to the map, the other members share the outside in proportion to their λ, and
        ``ratios`` is recomputed from the clipped box's area. With linear mixing the box is empty and
        ``outside = ratios = λ``.

    Shape:
        - ``boxes`` ``(B, 4)``; ``inside``, ``outside``, ``ratios`` ``(B, M)``; ``cutmix`` ``()``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> info = sample_mix_params(8, 2, 32, 32, cutmix_prob=1.0, generator=g)
        >>> info.boxes.shape, info.ratios.shape, bool(info.cutmix)
        (torch.Size([8, 4]), torch.Size([8, 2]), True)
        >>> bool(torch.allclose(info.masks_at().mean(dim=(2, 3)), info.ratios))  # λ = the realised mask mean
        True
    """
    return _sample_mix_params(
        check_int("batch_size", batch_size, minimum=0),
        check_int("num_subnetworks", num_subnetworks, minimum=1),
        check_int("height", height, minimum=1),
        check_int("width", width, minimum=1),
        alpha=alpha,
        cutmix_prob=cutmix_prob,
        shuffle_roles=shuffle_roles,
        device=device,
        dtype=dtype,
        generator=generator,
        backend=resolve_backend(backend),
    )


def _sample_mix_params(
    batch_size: int,
    m: int,
    height: int,
    width: int,
    *,
    alpha: float,
    cutmix_prob: float | Tensor,
    shuffle_roles: bool,
    device: torch.device | str | None,
    dtype: torch.dtype,
    generator: torch.Generator | None,
    backend: str,
) -> MixInfo:
    """:func:`sample_mix_params` of arguments already checked, ``backend`` resolved."""
    if m == 1:  # one member owns the whole map: its mask is 1 everywhere
        return MixInfo.identity(batch_size, 1, height, width, device=device, dtype=dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32  # compositions exact to the output dtype
    if generator is None and alpha > 0 and _NATIVE_DIRICHLET and not torch.compiler.is_compiling():
        # torch's native Dirichlet sampler: one op instead of about twenty (it takes no generator, hence the other path;
        # it has no fake-tensor kernel either, so torch.compile traces the other path)
        concentration = _constant(
            ("alpha", batch_size, m, float(alpha), device, work),
            lambda: torch.full((batch_size, m), float(alpha), device=device, dtype=work),
        )
        lam = torch._sample_dirichlet(concentration)
    else:
        lam = sample_dirichlet(alpha, batch_size, m, device=device, dtype=work, generator=generator)
    # the random draws, in this order: the box owner, the box centres, the CutMix-or-linear coin
    if shuffle_roles:
        owner = torch.randint(m, (1,), device=device, **generator_kwargs(generator))  # one owner for the batch
    else:
        owner = torch.zeros(1, device=device, dtype=torch.long)
    pixel = torch.randint(height * width, (batch_size,), device=device, **generator_kwargs(generator))
    coin = torch.rand((), device=device, **generator_kwargs(generator))
    prob = cutmix_prob if isinstance(cutmix_prob, Tensor) else float(cutmix_prob)
    if batch_size > 0 and use_triton(backend, lam) and not torch.compiler.is_compiling():
        # everything below in one kernel: on a GPU the about 30 small ops of the torch path cost a launch each
        return triton_ops().finish_mix(lam, owner, pixel, coin, prob, height, width, dtype)
    return finish_mix_reference(lam, owner, pixel, coin, prob, height, width, dtype)


def finish_mix_reference(
    lam: Tensor,
    owner: Tensor,
    pixel: Tensor,
    coin: Tensor,
    cutmix_prob: Tensor | float,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> MixInfo:
    """The deterministic part of :func:`sample_mix_params`: a :class:`MixInfo` from the random draws (torch ops).

    Args:
        lam: ``(B, M)`` Dirichlet draws (float32, or float64 for a float64 ``dtype``).
        owner: ``(1,)`` int64, the member that owns the CutMix box.
        pixel: ``(B,)`` int64 in ``[0, H W)``, the box centres as flat pixel indices.
        coin: 0-dim uniform draw; the batch uses CutMix when ``coin < cutmix_prob``.
        cutmix_prob: float or 0-dim tensor.
        height: H of the box grid.
        width: W of the box grid.
        dtype: dtype of the compositions and ratios.

    The Triton kernel ``mixshare_layers.functional._triton.kernels.finish_mix_kernel`` computes the same thing in
    one launch; this is its reference.
    """
    batch_size, m = lam.shape
    work = lam.dtype
    # (few, cheap ops: on the CPU this function's cost is the number of ops it launches, so both axes of the box are
    # computed at once on (B, 2) tensors, against cached (2,) size constants)
    sizes, half_sizes, divisors = _grid_constants(height, width, lam.device)
    # the owner's one-hot row, the others' indicator and their uniform shares: (M,) each, broadcast over the batch
    owner_hot, not_owner, uniform_others = _role_table(m, lam.device, work).index_select(0, owner)[0].unbind(0)
    lam_owner = lam.index_select(1, owner)  # (B, 1)

    # CutMix box for the owner: side ratio sqrt(λ_o), centre uniform over the pixels, corners clipped. Columns are
    # (y, x); truncation is the floor for these non-negative values.
    half = (lam_owner.sqrt() * half_sizes).long()  # (B, 2): floor(floor(S sqrt(λ)) / 2) = floor(S sqrt(λ) / 2)
    centre = (pixel[:, None] // divisors) % sizes  # (B, 2): (pixel // W, pixel % W), exactly uniform over the pixels
    lo = (centre - half).clamp_min(0)  # 0 <= centre < size: one side of each clamp is enough
    hi = torch.minimum(centre + half, sizes)
    cut_boxes = torch.stack([lo, hi], dim=2).view(batch_size, 4)  # (y0, y1, x0, x1)
    area = (hi - lo).prod(dim=1, keepdim=True, dtype=work) / (height * width)  # (B, 1): realised share of the owner

    # the other members share the outside linearly, in proportion to their λ (uniformly if all their λ underflowed)
    others = lam * not_owner
    denom = others.sum(dim=1, keepdim=True)
    cut_outside = torch.where(denom > 0, others / denom, uniform_others)
    cut_ratios = torch.lerp(cut_outside, owner_hot, area)  # area * owner_hot + (1 - area) * cut_outside

    use_cut = coin < cutmix_prob
    boxes = cut_boxes * use_cut  # empty boxes for linear mixing
    inside = torch.where(use_cut, owner_hot, lam)
    outside = torch.where(use_cut, cut_outside, lam)
    ratios = torch.where(use_cut, cut_ratios, lam)
    return MixInfo(
        boxes=boxes,
        inside=inside.to(dtype),
        outside=outside.to(dtype),
        ratios=ratios.to(dtype),
        cutmix=use_cut,
        height=height,
        width=width,
    )


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """A small constant tensor, built once per key (shapes, dtype, device).

    Building one is an op, and on CUDA a host-to-device copy; the sampler reuses them. While ``torch.compile``
    traces, the tensor is built inline (the compiler folds it) and not cached (no global side effect in a trace).
    """
    if torch.compiler.is_compiling():
        return make()
    if key not in _CONSTANTS:
        _CONSTANTS[key] = make()
    return _CONSTANTS[key]


def _grid_constants(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``[H, W]`` (int64), ``[H / 2, W / 2]`` (float32, exact) and ``[W, 1]`` (int64)."""
    sizes = _constant(("sizes", height, width, device), lambda: torch.tensor([height, width], device=device))
    half_sizes = _constant(("half", height, width, device), lambda: sizes.to(torch.float32) / 2)
    divisors = _constant(("divisors", width, device), lambda: torch.tensor([width, 1], device=device))
    return sizes, half_sizes, divisors


def _role_table(m: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(M, 3, M)``: for each owner ``o``, its one-hot row, the others' indicator and their uniform shares."""

    def make() -> Tensor:
        hot = torch.eye(m, device=device, dtype=dtype)
        return torch.stack([hot, 1 - hot, (1 - hot) / (m - 1)], dim=1)

    return _constant(("roles", m, device, dtype), make)


def _check_mix_inputs(encodings: Tensor, info: MixInfo) -> None:
    check_ndim("encodings", encodings, 5, "(B, M, C, H, W)")
    check_mix_info("info", info)
    b, m = encodings.shape[:2]
    if info.inside.shape != (b, m):
        raise ValueError(
            f"encodings of shape {tuple(encodings.shape)} (B={b}, M={m}) do not match the MixInfo, which describes "
            f"B={info.inside.shape[0]}, M={info.inside.shape[1]}"
        )


class _MixTorch(torch.autograd.Function):
    """``sum_i w_i * e_i`` with the per-pixel weights ``w`` ``(B, M, H, W)`` (scale and masks folded in).

    The backward writes ``grad_e = w[:, :, None] * grad`` in one pass; the weights get no gradient (they describe a
    random draw).
    """

    @staticmethod
    def forward(ctx, encodings: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(weights)
        ctx.enc_dtype = encodings.dtype
        acc = weights.dtype
        m = encodings.shape[1]
        e = encodings if encodings.dtype == acc else encodings.to(acc)
        out = torch.mul(e[:, 0], weights[:, 0, None])
        for i in range(1, m):
            out.addcmul_(e[:, i], weights[:, i, None])
        return out.to(encodings.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (weights,) = ctx.saved_tensors
        grad_e = torch.mul(grad.to(weights.dtype)[:, None], weights[:, :, None])
        return grad_e.to(ctx.enc_dtype), None


def mix(encodings: Tensor, info: MixInfo, scale: float | None = None, *, backend: str | None = None) -> Tensor:
    """Apply a mix: ``scale * sum_i m_i * e_i`` with the masks of ``info`` rendered at the encodings' size.

    Args:
        encodings: ``(B, M, C, H, W)``, any memory layout (channels_last and other strides are read as they are by
            the Triton kernel; the torch path lets TensorIterator handle them).
        info: the mix to apply (from :func:`sample_mix_params` or a :class:`~mixshare_layers.CutMixMixer`).
        scale: defaults to M, so that the test-time plain sum and training mixes have the same scale.
        backend: ``"auto"`` (Triton for CUDA tensors when it imports, else torch), ``"torch"`` or ``"triton"``;
            ``None`` reads ``MIXSHARE_BACKEND`` (see :mod:`mixshare_layers.functional.backend`).

    Shape:
        - Output: ``(B, C, H, W)`` in the encodings' dtype (contiguous for the Triton path). Products and the sum
          over members are computed in float32 for float16/bfloat16 encodings (float64 for float64), rounded once.
          The gradient flows to ``encodings`` only; ``info`` describes a random draw and gets none.

    Example:
        >>> from mixshare_layers import MixInfo
        >>> e = torch.randn(2, 3, 4, 8, 8)
        >>> torch.allclose(mix(e, MixInfo.identity(2, 3, 8, 8), scale=1.0), e.sum(dim=1))  # identity masks: sum
        True
    """
    _check_mix_inputs(encodings, info)
    scale = float(encodings.shape[1]) if scale is None else check_real("scale", scale)
    return _mix(encodings, info, scale, resolve_backend(backend))


def _mix(encodings: Tensor, info: MixInfo, scale: float, backend: str) -> Tensor:
    """:func:`mix` of arguments already checked, ``backend`` resolved (what :class:`~mixshare_layers.CutMixMixer`
    calls)."""
    m = encodings.shape[1]
    if use_triton(backend, encodings):
        ops = triton_ops()
        fn = ops.mix if torch.compiler.is_compiling() else ops.mix_eager  # the custom op for the compiler
        return fn(encodings, info.boxes, info.inside, info.outside, info.height, info.width, scale)
    acc = torch.promote_types(encodings.dtype, torch.float32)
    h, w = encodings.shape[-2:]
    weights = info.masks_at(h, w, dtype=acc) * scale  # (B, M, H, W)
    if torch.compiler.is_compiling():
        # Under torch.compile plain differentiable ops: the compiler fuses them into one pass anyway, and this keeps
        # the compiled gradient correct on every torch version (torch 2.11's aot_eager got the custom Function's
        # gradient wrong for one member; seen on an H200 in benchmarks/gpu_check.sh).
        e = encodings.to(acc)
        out = e[:, 0] * weights[:, 0, None]
        for i in range(1, m):
            out = torch.addcmul(out, e[:, i], weights[:, i, None])
        return out.to(encodings.dtype)
    return _MixTorch.apply(encodings, weights)


def mix_reference(encodings: Tensor, info: MixInfo, scale: float | None = None) -> Tensor:
    """Naive reference of :func:`mix` (materialises the M masked copies); for tests.

    Args:
        encodings: ``(B, M, C, H, W)``.
        info: the mix to apply.
        scale: defaults to M.

    Shape:
        - Output: ``(B, C, H, W)``.

    Example:
        >>> info = sample_mix_params(2, 2, 8, 8, cutmix_prob=1.0, generator=torch.Generator().manual_seed(0))
        >>> e = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64)
        >>> torch.allclose(mix(e, info), mix_reference(e, info))
        True
    """
    _check_mix_inputs(encodings, info)
    m = encodings.shape[1]
    scale = float(m) if scale is None else scale
    masks = info.masks_at(encodings.shape[-2], encodings.shape[-1], dtype=encodings.dtype)
    return scale * (masks[:, :, None] * encodings).sum(dim=1)
