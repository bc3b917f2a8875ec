"""Triton kernels of the masked ops; the box coverage is computed in-kernel from the int boxes.

Coverage (see :func:`mixshare_layers.mix_info.interval_coverage`): cell ``j`` of ``target`` equal cells of
``[0, native)`` spans ``[j * native / target, (j + 1) * native / target)``; the part of it inside ``[lo, hi)`` is
computed in int32 integers scaled by ``target`` (exact while ``native * target < 2**31``), then divided by
``native``. At the native resolution it is 0 or 1. The coverage of cell ``(y, x)`` is ``cov_y(y) * cov_x(x)``.

Scalar arguments are converted with ``tl.cast`` (an integer argument equal to 1 arrives as a constant, which has no
``.to``); float32 divisions and square roots are the IEEE-rounded ones, as in torch.

Every kernel works on 2-D ``(rows, columns)`` tiles of the maps (3-D with a channel block for the unmix pooling), so the
coverage is computed once per row and once per column of a tile rather than per element, no element index is ever
divided into ``(y, x)``, and a map whose columns are contiguous (``stride_x == 1``, which Triton specialises) is read
and written with vector accesses. Inputs are read through their strides (channels_last and other layouts need no copy);
accumulation is in ``ACC`` (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _coverage(lo, hi, j, native, target, ACC: tl.constexpr):
    cell_lo = j * native
    cell_hi = cell_lo + native
    overlap = tl.minimum(hi * target, cell_hi) - tl.maximum(lo * target, cell_lo)
    overlap = tl.maximum(overlap, 0)
    return overlap.to(ACC) / native


@triton.jit
def _tile_coverage(box_ptr, b, ys, xs, H, W, NH, NW, ACC: tl.constexpr):
    """Coverage of the cells ``(ys, xs)`` of sample ``b``: a ``(len(ys), len(xs))`` tile."""
    y0 = tl.load(box_ptr + b * 4 + 0).to(tl.int32)
    y1 = tl.load(box_ptr + b * 4 + 1).to(tl.int32)
    x0 = tl.load(box_ptr + b * 4 + 2).to(tl.int32)
    x1 = tl.load(box_ptr + b * 4 + 3).to(tl.int32)
    cov_y = _coverage(y0, y1, ys, NH, H, ACC)
    cov_x = _coverage(x0, x1, xs, NW, W, ACC)
    return cov_y[:, None] * cov_x[None, :]


@triton.jit
def mix_fwd_kernel(
    e_ptr,
    box_ptr,
    in_ptr,
    out_ptr,
    o_ptr,
    C,
    H,
    W,
    NH,
    NW,
    scale,
    s_b,
    s_m,
    s_c,
    s_y,
    s_x,
    M: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
    ACC: tl.constexpr,
):
    """o[b, c, y, x] = scale * sum_i (out_i + cov (in_i - out_i)) e[b, i, c, y, x]; a program per (b, c, row block)."""
    pid_bc = tl.program_id(0)
    b = pid_bc // C
    c = pid_bc % C
    ys = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = tl.arange(0, BLOCK_X)
    ok = (ys < H)[:, None] & (xs < W)[None, :]
    cov = _tile_coverage(box_ptr, b, ys, xs, H, W, NH, NW, ACC)
    src = e_ptr + (b.to(tl.int64) * s_b + c.to(tl.int64) * s_c) + (ys[:, None] * s_y + xs[None, :] * s_x)
    acc = tl.zeros([BLOCK_Y, BLOCK_X], dtype=ACC)
    for i in tl.static_range(M):
        w_in = tl.load(in_ptr + b * M + i).to(ACC)
        w_out = tl.load(out_ptr + b * M + i).to(ACC)
        ev = tl.load(src, mask=ok, other=0.0).to(ACC)
        acc += (w_out + cov * (w_in - w_out)) * ev
        src += s_m  # pointer arithmetic: no int32 product of the member stride
    dst = o_ptr + pid_bc.to(tl.int64) * H * W + (ys[:, None] * W + xs[None, :])
    tl.store(dst, (acc * scale).to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def mix_bwd_kernel(
    g_ptr,
    box_ptr,
    in_ptr,
    out_ptr,
    ge_ptr,
    C,
    H,
    W,
    NH,
    NW,
    scale,
    s_b,
    s_c,
    s_y,
    s_x,
    M: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
    ACC: tl.constexpr,
):
    """ge[b, i, c, y, x] = scale * m_i(y, x) * g[b, c, y, x]: the gradient read once, the M outputs written once."""
    pid_bc = tl.program_id(0)
    b = pid_bc // C
    c = pid_bc % C
    ys = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = tl.arange(0, BLOCK_X)
    ok = (ys < H)[:, None] & (xs < W)[None, :]
    cov = _tile_coverage(box_ptr, b, ys, xs, H, W, NH, NW, ACC)
    src = g_ptr + (b.to(tl.int64) * s_b + c.to(tl.int64) * s_c) + (ys[:, None] * s_y + xs[None, :] * s_x)
    g = tl.load(src, mask=ok, other=0.0).to(ACC) * scale
    cell = ys[:, None] * W + xs[None, :]
    for i in tl.static_range(M):
        w_in = tl.load(in_ptr + b * M + i).to(ACC)
        w_out = tl.load(out_ptr + b * M + i).to(ACC)
        row = (b.to(tl.int64) * M + i) * C + c
        val = (w_out + cov * (w_in - w_out)) * g
        tl.store(ge_ptr + row * H * W + cell, val.to(ge_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sqrt(x, WORK: tl.constexpr):
    """IEEE-rounded square root, as torch computes it (float64's ``sqrt`` already is)."""
    if WORK == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(a, b, WORK: tl.constexpr):
    """IEEE-rounded division (Triton's float32 ``/`` may be approximate; float64's is exact)."""
    if WORK == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def finish_mix_kernel(
    lam_ptr,
    owner_ptr,
    pixel_ptr,
    coin_ptr,
    prob_ptr,
    prob_value,
    boxes_ptr,
    inside_ptr,
    outside_ptr,
    ratios_ptr,
    cut_ptr,
    B,
    H,
    W,
    M: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PROB_IN_MEMORY: tl.constexpr,
    WORK: tl.constexpr,
):
    """A MixInfo from the random draws (see ``functional.mixing.finish_mix_reference``); a program per block of rows.

    Same operations as the reference, with IEEE-rounded square root and divisions, so the boxes are identical and
    the compositions agree to the last bits.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    r_ok = rows < B
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    ok = r_ok[:, None] & m_ok[None, :]
    lam = tl.load(lam_ptr + rows[:, None] * M + ms[None, :], mask=ok, other=0.0).to(WORK)
    owner = tl.load(owner_ptr)
    is_owner = ms == owner
    owner_hot = tl.where(is_owner, 1.0, 0.0).to(WORK)  # (BLOCK_M,)
    not_owner = 1.0 - owner_hot
    lam_owner = tl.sum(tl.where(is_owner[None, :], lam, 0.0), axis=1)  # (BLOCK_B,): exact, one non-zero term

    # the box: half sides floor(S sqrt(λ_o) / 2), centre from the flat pixel index, corners clipped
    side = _sqrt(lam_owner, WORK)
    half_h = (side * tl.cast(tl.cast(H, tl.float32) * 0.5, WORK)).to(tl.int32)
    half_w = (side * tl.cast(tl.cast(W, tl.float32) * 0.5, WORK)).to(tl.int32)
    pixel = tl.load(pixel_ptr + rows, mask=r_ok, other=0).to(tl.int32)
    cy = pixel // W
    cx = pixel % W
    y0 = tl.maximum(cy - half_h, 0)
    y1 = tl.minimum(cy + half_h, H)
    x0 = tl.maximum(cx - half_w, 0)
    x1 = tl.minimum(cx + half_w, W)
    cells = tl.cast(H * W, WORK) + tl.zeros([BLOCK_B], dtype=WORK)  # (the precise division takes equal shapes)
    area = _div((y1 - y0).to(WORK) * (x1 - x0).to(WORK), cells, WORK)  # (BLOCK_B,)

    # the others share the outside in proportion to their λ (uniformly if all of theirs underflowed to 0)
    others = lam * not_owner[None, :]
    denom = tl.sum(others, axis=1)
    uniform = _div(not_owner, tl.full([BLOCK_M], M - 1, WORK), WORK)
    safe = tl.where(denom > 0, denom, 1.0).to(WORK)
    safe_2d = tl.broadcast_to(safe[:, None], [BLOCK_B, BLOCK_M])
    cut_outside = tl.where((denom > 0)[:, None], _div(others, safe_2d, WORK), uniform[None, :])
    # torch.lerp(cut_outside, owner_hot, area), with torch's two-sided formula
    w = area[:, None]
    diff = owner_hot[None, :] - cut_outside
    cut_ratios = tl.where(w < 0.5, cut_outside + w * diff, owner_hot[None, :] - diff * (1.0 - w))

    coin = tl.load(coin_ptr)
    if PROB_IN_MEMORY:
        prob = tl.load(prob_ptr)
    else:
        prob = prob_value
    use_cut = coin < prob
    if tl.program_id(0) == 0:
        tl.store(cut_ptr, use_cut)
    box_row = boxes_ptr + rows.to(tl.int64) * 4
    zero = tl.zeros([BLOCK_B], dtype=tl.int32)
    tl.store(box_row + 0, tl.where(use_cut, y0, zero).to(tl.int64), mask=r_ok)
    tl.store(box_row + 1, tl.where(use_cut, y1, zero).to(tl.int64), mask=r_ok)
    tl.store(box_row + 2, tl.where(use_cut, x0, zero).to(tl.int64), mask=r_ok)
    tl.store(box_row + 3, tl.where(use_cut, x1, zero).to(tl.int64), mask=r_ok)
    dst = rows[:, None] * M + ms[None, :]
    hot_rows = owner_hot[None, :] + tl.zeros([BLOCK_B, BLOCK_M], dtype=WORK)
    tl.store(inside_ptr + dst, tl.where(use_cut, hot_rows, lam).to(inside_ptr.dtype.element_ty), mask=ok)
    tl.store(outside_ptr + dst, tl.where(use_cut, cut_outside, lam).to(outside_ptr.dtype.element_ty), mask=ok)
    tl.store(ratios_ptr + dst, tl.where(use_cut, cut_ratios, lam).to(ratios_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _member_weights(in_ptr, out_ptr, b, i, r, M: tl.constexpr, ACC: tl.constexpr):
    """Member ``i``'s faded compositions ``m + r (1 - m)`` inside and outside the box (scalars)."""
    w_in = tl.load(in_ptr + b * M + i).to(ACC)
    w_out = tl.load(out_ptr + b * M + i).to(ACC)
    return w_in + r * (1.0 - w_in), w_out + r * (1.0 - w_out)


@triton.jit
def _box_area(box_ptr, b, H, W, NH, NW, ACC: tl.constexpr):
    """The box's area in cells of the ``H x W`` map: ``(y1 - y0)(x1 - x0) H W / (NH NW)`` (= the sum of coverage)."""
    y0 = tl.load(box_ptr + b * 4 + 0)
    y1 = tl.load(box_ptr + b * 4 + 1)
    x0 = tl.load(box_ptr + b * 4 + 2)
    x1 = tl.load(box_ptr + b * 4 + 3)
    return ((y1 - y0) * (x1 - x0)).to(ACC) * _div(tl.cast(H * W, ACC), tl.cast(NH * NW, ACC), ACC)


@triton.jit
def unmix_pool_fwd_kernel(
    f_ptr,
    box_ptr,
    in_ptr,
    out_ptr,
    r_ptr,
    pooled_ptr,
    C,
    H,
    W,
    NH,
    NW,
    num_unmixed,
    s_b,
    s_c,
    s_y,
    s_x,
    M: tl.constexpr,
    HAS_R: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
    ACC: tl.constexpr,
):
    """pooled[b, i, c]: member i's masked average (or sum / hw) of f[b, c]; a program per (b, channel block).

    The two sums S_all = sum f and S_box = sum cov f accumulate element-wise in registers and are reduced once; the
    M pooled values per channel are formed from them in the epilogue (channels from ``num_unmixed`` on get the plain
    average).
    """
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    xs = tl.arange(0, BLOCK_X)
    x_ok = xs < W
    base = f_ptr + b.to(tl.int64) * s_b + (cs.to(tl.int64) * s_c)[:, None, None]
    acc_all = tl.zeros([BLOCK_C, BLOCK_Y, BLOCK_X], dtype=ACC)
    acc_box = tl.zeros([BLOCK_C, BLOCK_Y, BLOCK_X], dtype=ACC)
    for y_start in range(0, H, BLOCK_Y):
        ys = y_start + tl.arange(0, BLOCK_Y)
        cov = _tile_coverage(box_ptr, b, ys, xs, H, W, NH, NW, ACC)
        cell = ys[:, None] * s_y + xs[None, :] * s_x
        ok = c_ok[:, None, None] & ((ys < H)[:, None] & x_ok[None, :])[None, :, :]
        f = tl.load(base + cell[None, :, :], mask=ok, other=0.0).to(ACC)
        acc_all += f
        acc_box += f * cov[None, :, :]
    s_all = tl.sum(tl.sum(acc_all, axis=2), axis=1)
    s_box = tl.sum(tl.sum(acc_box, axis=2), axis=1)

    if HAS_R:  # the fadeout strength, a 0-dim tensor (a float strength is applied to the compositions beforehand)
        r = tl.load(r_ptr).to(ACC)
    else:
        r = 0.0
    hw = tl.cast(H * W, ACC)
    area = _box_area(box_ptr, b, H, W, NH, NW, ACC)
    zeros = tl.zeros([BLOCK_C], dtype=ACC)
    plain = _div(s_all, zeros + hw, ACC)
    unmixed = cs < num_unmixed
    for i in tl.static_range(M):
        w_in, w_out = _member_weights(in_ptr, out_ptr, b, i, r, M, ACC)
        num = w_in * s_box + w_out * (s_all - s_box)
        if NORMALIZE:
            mass = w_in * area + w_out * (hw - area)
            val = tl.where(mass > 0, _div(num, zeros + tl.where(mass > 0, mass, 1.0), ACC), 0.0)
        else:
            val = _div(num, zeros + hw, ACC)
        val = tl.where(unmixed, val, plain)
        dst = pooled_ptr + (b.to(tl.int64) * M + i) * C + cs
        tl.store(dst, val.to(pooled_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def unmix_pool_bwd_kernel(
    gp_ptr,
    box_ptr,
    in_ptr,
    out_ptr,
    r_ptr,
    gf_ptr,
    C,
    H,
    W,
    NH,
    NW,
    num_unmixed,
    M: tl.constexpr,
    HAS_R: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
    ACC: tl.constexpr,
):
    """gf[b, c, y, x] = g_all[b, c] + g_box[b, c] cov(y, x), with g_all / g_box gathered from the M pooled
    gradients in the prologue; written once (contiguous ``(B, C, h, w)``)."""
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ys = tl.program_id(2) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = tl.arange(0, BLOCK_X)
    c_ok = cs < C
    if HAS_R:  # the fadeout strength, a 0-dim tensor (a float strength is applied to the compositions beforehand)
        r = tl.load(r_ptr).to(ACC)
    else:
        r = 0.0
    hw = tl.cast(H * W, ACC)
    area = _box_area(box_ptr, b, H, W, NH, NW, ACC)
    unmixed = cs < num_unmixed
    g_all = tl.zeros([BLOCK_C], dtype=ACC)
    g_box = tl.zeros([BLOCK_C], dtype=ACC)
    g_plain = tl.zeros([BLOCK_C], dtype=ACC)
    for i in tl.static_range(M):
        g = tl.load(gp_ptr + (b.to(tl.int64) * M + i) * C + cs, mask=c_ok, other=0.0).to(ACC)
        w_in, w_out = _member_weights(in_ptr, out_ptr, b, i, r, M, ACC)
        if NORMALIZE:
            mass = w_in * area + w_out * (hw - area)
            inv = tl.where(mass > 0, _div(tl.cast(1.0, ACC), tl.where(mass > 0, mass, 1.0).to(ACC), ACC), 0.0)
        else:
            inv = _div(tl.cast(1.0, ACC), hw, ACC)
        g_all += g * (w_out * inv)
        g_box += g * ((w_in - w_out) * inv)
        g_plain += g
    g_all = tl.where(unmixed, g_all, _div(g_plain, tl.zeros([BLOCK_C], dtype=ACC) + hw, ACC))
    g_box = tl.where(unmixed, g_box, 0.0)
    cov = _tile_coverage(box_ptr, b, ys, xs, H, W, NH, NW, ACC)
    val = g_all[:, None, None] + g_box[:, None, None] * cov[None, :, :]
    cell = ys[:, None] * W + xs[None, :]
    rows = b.to(tl.int64) * C + cs
    dst = gf_ptr + (rows * H * W)[:, None, None] + cell[None, :, :]
    ok = c_ok[:, None, None] & ((ys < H)[:, None] & (xs < W)[None, :])[None, :, :]
    tl.store(dst, val.to(gf_ptr.dtype.element_ty), mask=ok)
