"""Triton kernels of the masked ops; the box coverage of every cell is computed in-kernel from the int boxes.

Coverage (see :func:`mixshare_layers.mix_info.interval_coverage`): cell ``j`` of ``target`` equal cells of
``[0, native)`` spans ``[j * native / target, (j + 1) * native / target)``; the part of it inside ``[lo, hi)`` is
computed in integers scaled by ``target`` (exact), then divided by ``native``. At the native resolution it is 0 or 1.
The coverage of cell ``(y, x)`` is ``cov_y(y) * cov_x(x)``.

Each kernel reads the input through its strides (channels_last and other layouts need no copy) and accumulates in
``ACC`` (float32, or float64 for float64 inputs).
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
def _box_coverage(box_ptr, b, y, x, H, W, NH, NW, ACC: tl.constexpr):
    y0 = tl.load(box_ptr + b * 4 + 0)
    y1 = tl.load(box_ptr + b * 4 + 1)
    x0 = tl.load(box_ptr + b * 4 + 2)
    x1 = tl.load(box_ptr + b * 4 + 3)
    return _coverage(y0, y1, y, NH, H, ACC) * _coverage(x0, x1, x, NW, W, ACC)


@triton.jit
def mix_fwd_kernel(
    e_ptr, box_ptr, in_ptr, out_ptr, o_ptr,
    C, H, W, NH, NW, scale,
    s_b, s_m, s_c, s_y, s_x,
    M: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """o[b, c, p] = scale * sum_i (out_i + cov(p) (in_i - out_i)) e[b, i, c, p]; one program per (b, c, block)."""
    pid_bc = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = pid_bc // C
    c = pid_bc % C
    hw = H * W
    p = pid_p * BLOCK + tl.arange(0, BLOCK)
    valid = p < hw
    y = p // W
    x = p % W
    cov = _box_coverage(box_ptr, b, y, x, H, W, NH, NW, ACC)
    base = b.to(tl.int64) * s_b + c.to(tl.int64) * s_c + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x
    acc = tl.zeros([BLOCK], dtype=ACC)
    for i in tl.static_range(M):
        w_in = tl.load(in_ptr + b * M + i).to(ACC)
        w_out = tl.load(out_ptr + b * M + i).to(ACC)
        ev = tl.load(e_ptr + base + i * s_m, mask=valid, other=0.0).to(ACC)
        acc += (w_out + cov * (w_in - w_out)) * ev
    acc = acc * scale
    dst = o_ptr + pid_bc.to(tl.int64) * hw + p
    tl.store(dst, acc.to(o_ptr.dtype.element_ty), mask=valid)


@triton.jit
def mix_bwd_kernel(
    g_ptr, box_ptr, in_ptr, out_ptr, ge_ptr,
    C, H, W, NH, NW, scale,
    s_b, s_c, s_y, s_x,
    M: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """ge[b, i, c, p] = scale * m_i(p) * g[b, c, p]: the gradient is read once, the M outputs written once."""
    pid_bc = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = pid_bc // C
    c = pid_bc % C
    hw = H * W
    p = pid_p * BLOCK + tl.arange(0, BLOCK)
    valid = p < hw
    y = p // W
    x = p % W
    cov = _box_coverage(box_ptr, b, y, x, H, W, NH, NW, ACC)
    src = b.to(tl.int64) * s_b + c.to(tl.int64) * s_c + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x
    g = tl.load(g_ptr + src, mask=valid, other=0.0).to(ACC) * scale
    for i in tl.static_range(M):
        w_in = tl.load(in_ptr + b * M + i).to(ACC)
        w_out = tl.load(out_ptr + b * M + i).to(ACC)
        row = (b.to(tl.int64) * M + i) * C + c
        tl.store(ge_ptr + row * hw + p, ((w_out + cov * (w_in - w_out)) * g).to(ge_ptr.dtype.element_ty), mask=valid)


@triton.jit
def unmix_sums_fwd_kernel(
    f_ptr, box_ptr, sall_ptr, sbox_ptr,
    C, H, W, NH, NW,
    s_b, s_c, s_y, s_x,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    """S_all[b, c] = sum_p f, S_box[b, c] = sum_p cov(p) f; one program per (b, block of channels)."""
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    hw = H * W
    row = b.to(tl.int64) * s_b + cs.to(tl.int64) * s_c
    acc_all = tl.zeros([BLOCK_C], dtype=ACC)
    acc_box = tl.zeros([BLOCK_C], dtype=ACC)
    for start in range(0, hw, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        p_ok = p < hw
        y = p // W
        x = p % W
        cov = _box_coverage(box_ptr, b, y, x, H, W, NH, NW, ACC)
        col = y.to(tl.int64) * s_y + x.to(tl.int64) * s_x
        f = tl.load(f_ptr + row[:, None] + col[None, :], mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(ACC)
        acc_all += tl.sum(f, axis=1)
        acc_box += tl.sum(f * cov[None, :], axis=1)
    dst = b.to(tl.int64) * C + cs
    tl.store(sall_ptr + dst, acc_all, mask=c_ok)
    tl.store(sbox_ptr + dst, acc_box, mask=c_ok)


@triton.jit
def unmix_sums_bwd_kernel(
    gall_ptr, gbox_ptr, box_ptr, gf_ptr,
    C, H, W, NH, NW,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    """gf[b, c, p] = g_all[b, c] + g_box[b, c] * cov(p), written once (contiguous ``(B, C, h, w)``)."""
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    c_ok = cs < C
    hw = H * W
    p_ok = p < hw
    y = p // W
    x = p % W
    cov = _box_coverage(box_ptr, b, y, x, H, W, NH, NW, ACC)
    src = b.to(tl.int64) * C + cs
    g_all = tl.load(gall_ptr + src, mask=c_ok, other=0.0).to(ACC)
    g_box = tl.load(gbox_ptr + src, mask=c_ok, other=0.0).to(ACC)
    val = g_all[:, None] + g_box[:, None] * cov[None, :]
    dst = (b.to(tl.int64) * C + cs.to(tl.int64))[:, None] * hw + p[None, :]
    tl.store(gf_ptr + dst, val.to(gf_ptr.dtype.element_ty), mask=c_ok[:, None] & p_ok[None, :])
