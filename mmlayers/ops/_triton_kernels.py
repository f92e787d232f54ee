"""Triton kernels of the ``"triton"`` deformable-attention backend (undecorated).

Shape key: b batch · n queries · s value tokens · h heads · dh head width · l levels ·
p sampling points.

The functions are plain Python on purpose: ``triton.jit`` decides at *decoration* time
whether a kernel is compiled or run by the interpreter (``TRITON_INTERPRET=1``), so
`mmlayers.ops._triton` wraps them on first use, once per mode. Importing this
module without triton leaves the kernels unusable (``tl`` is ``None``) but lets tools
such as ``pytest --doctest-modules`` import it; `mmlayers.ops._triton` only wraps
them when triton is installed.

One program owns ``BLOCK_N`` queries of one (batch, head) pair (a 1-D grid of
``cdiv(n, BLOCK_N) · b · h`` programs) and loops over the
levels, whose ``(H, W, start)`` rows come from a small int32 device tensor ``meta``
(l, 3), so the level count and sizes are runtime values and a new image count does not
recompile. Inside a level the samples form a ``(BLOCK_N, BLOCK_P)`` tile: coordinates,
corner indices and bilinear weights are computed once per sample in ``COMPUTE``
(fp32, or fp64 for fp64 inputs) and broadcast over the head dimension, which is the
innermost (contiguous) axis of every ``(BLOCK_N, BLOCK_P, BLOCK_D)`` gather.

Bilinear sampling follows ``grid_sample(align_corners=False, padding_mode="zeros")``:
pixel ``x = loc_x · W − 0.5``; corners outside the map read zero. Coordinates are clamped
to ``[−2, W + 1]`` before the integer cast (all four corners of such a point are outside,
so value and gradient are unchanged) to keep the cast finite. A NaN or infinite location
makes its query's output (and its own location and weight gradients) NaN, as in
``grid_sample``, instead of silently reading zeros.
"""

from __future__ import annotations

try:
    import triton.language as tl
except ImportError:  # the backend reports "triton is not installed" and never gets here
    tl = None

__all__ = ["deform_attn_bwd_kernel", "deform_attn_fwd_kernel"]


def deform_attn_fwd_kernel(
    value_ptr, meta_ptr, loc_ptr, attn_ptr, vis_ptr, out_ptr,
    n_queries, n_tokens, n_heads, head_dim, n_levels, n_points, levels_per_group,
    vis_sb, vis_sn, vis_sm,
    HAS_VIS: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out (b, n, h·dh) = Σ_l Σ_p attn · bilinear(value_l, loc); one (query block, b·h)
    per program; ``vis`` (b, n, m) uint8 masks image ``l // levels_per_group``."""
    n_blocks = tl.cdiv(n_queries, BLOCK_N)  # 1-D grid, query blocks fastest: neighbours
    pid_n = tl.program_id(0) % n_blocks      # share one (b, h) slice of value in cache
    pid_bh = tl.program_id(0) // n_blocks
    bi = pid_bh // n_heads
    hi = pid_bh % n_heads
    q = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pp = tl.arange(0, BLOCK_P)
    dd = tl.arange(0, BLOCK_D)
    mask_q = q < n_queries
    mask_qp = mask_q[:, None] & (pp[None, :] < n_points)
    mask_d = dd < head_dim
    row_stride = n_heads * head_dim
    v_base = value_ptr + (bi.to(tl.int64) * n_tokens * n_heads + hi) * head_dim
    # Offset of (b, q, h, l=0, p=0) in attn (b, n, h, l, p); loc has twice as many.
    qh = ((bi.to(tl.int64) * n_queries + q) * n_heads + hi) * (n_levels * n_points)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=COMPUTE)
    for lvl in range(0, n_levels):
        if HAS_VIS:
            vq = tl.load(vis_ptr + bi * vis_sb + q * vis_sn + (lvl // levels_per_group) * vis_sm,
                         mask=mask_q, other=0).to(tl.int32)
            active = tl.max(vq, axis=0) > 0
        else:
            vq = tl.full((BLOCK_N,), 1, tl.int32)
            active = lvl >= 0
        if active:  # skip images that no query of the block can see
            hgt = tl.load(meta_ptr + lvl * 3)
            wid = tl.load(meta_ptr + lvl * 3 + 1)
            start = tl.load(meta_ptr + lvl * 3 + 2)
            off = qh[:, None] + lvl * n_points + pp[None, :]
            a = tl.load(attn_ptr + off, mask=mask_qp, other=0).to(COMPUTE)
            a = a * (vq > 0).to(COMPUTE)[:, None]
            lx = tl.load(loc_ptr + 2 * off, mask=mask_qp, other=0).to(COMPUTE)
            ly = tl.load(loc_ptr + 2 * off + 1, mask=mask_qp, other=0).to(COMPUTE)
            wf = wid.to(COMPUTE)
            hf = hgt.to(COMPUTE)
            x = tl.minimum(tl.maximum(lx * wf - 0.5, -2.0), wf + 1.0)
            y = tl.minimum(tl.maximum(ly * hf - 0.5, -2.0), hf + 1.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            # 0 for finite locations, NaN for NaN/inf ones: propagate like grid_sample.
            acc += tl.sum((lx - lx) + (ly - ly), axis=1)[:, None]
            for c in tl.static_range(4):
                dx = c % 2
                dy = c // 2
                xc = x0 + dx
                yc = y0 + dy
                valid = mask_qp & (xc >= 0) & (xc < wid) & (yc >= 0) & (yc < hgt)
                wx = (1 - dx) + (2 * dx - 1) * fx
                wy = (1 - dy) + (2 * dy - 1) * fy
                wgt = tl.where(valid, a * wx * wy, 0.0)
                rows = tl.where(valid, start + yc * wid + xc, 0).to(tl.int64)
                ptrs = v_base + rows[:, :, None] * row_stride + dd[None, None, :]
                v = tl.load(ptrs, mask=valid[:, :, None] & mask_d[None, None, :], other=0)
                acc += tl.sum(wgt[:, :, None] * v.to(COMPUTE), axis=1)
    out_offs = ((bi.to(tl.int64) * n_queries + q) * n_heads + hi) * head_dim
    out_ptrs = out_ptr + out_offs[:, None] + dd[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=mask_q[:, None] & mask_d[None, :])


def deform_attn_bwd_kernel(
    grad_out_ptr, value_ptr, meta_ptr, loc_ptr, attn_ptr, vis_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    n_queries, n_tokens, n_heads, head_dim, n_levels, n_points, levels_per_group,
    vis_sb, vis_sn, vis_sm,
    HAS_VIS: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradients of `deform_attn_fwd_kernel` for value, loc and attn.

    ``grad_value`` is a ``COMPUTE`` workspace (b, s, h, dh) filled by atomic adds; when
    all queries of the block share every point's top-left corner (identical locations,
    e.g. the synchronizer at initialisation) the block's contributions are summed in
    registers and one atomic row per (point, corner) is issued instead of one per query.
    ``grad_loc`` and ``grad_attn`` are written once per element.
    """
    n_blocks = tl.cdiv(n_queries, BLOCK_N)  # 1-D grid, query blocks fastest: neighbours
    pid_n = tl.program_id(0) % n_blocks      # share one (b, h) slice of value in cache
    pid_bh = tl.program_id(0) // n_blocks
    bi = pid_bh // n_heads
    hi = pid_bh % n_heads
    q = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pp = tl.arange(0, BLOCK_P)
    dd = tl.arange(0, BLOCK_D)
    mask_q = q < n_queries
    mask_qp = mask_q[:, None] & (pp[None, :] < n_points)
    mask_d = dd < head_dim
    row_stride = n_heads * head_dim
    bh_off = (bi.to(tl.int64) * n_tokens * n_heads + hi) * head_dim
    v_base = value_ptr + bh_off
    gv_base = grad_value_ptr + bh_off
    qh = ((bi.to(tl.int64) * n_queries + q) * n_heads + hi) * (n_levels * n_points)
    go_offs = ((bi.to(tl.int64) * n_queries + q) * n_heads + hi) * head_dim
    g = tl.load(grad_out_ptr + go_offs[:, None] + dd[None, :],
                mask=mask_q[:, None] & mask_d[None, :], other=0).to(COMPUTE)
    for lvl in range(0, n_levels):
        off = qh[:, None] + lvl * n_points + pp[None, :]
        if HAS_VIS:
            vq = tl.load(vis_ptr + bi * vis_sb + q * vis_sn + (lvl // levels_per_group) * vis_sm,
                         mask=mask_q, other=0).to(tl.int32)
            active = tl.max(vq, axis=0) > 0
        else:
            vq = tl.full((BLOCK_N,), 1, tl.int32)
            active = lvl >= 0
        if active:
            hgt = tl.load(meta_ptr + lvl * 3)
            wid = tl.load(meta_ptr + lvl * 3 + 1)
            start = tl.load(meta_ptr + lvl * 3 + 2)
            seen = (vq > 0).to(COMPUTE)[:, None]
            a = tl.load(attn_ptr + off, mask=mask_qp, other=0).to(COMPUTE) * seen
            lx = tl.load(loc_ptr + 2 * off, mask=mask_qp, other=0).to(COMPUTE)
            ly = tl.load(loc_ptr + 2 * off + 1, mask=mask_qp, other=0).to(COMPUTE)
            wf = wid.to(COMPUTE)
            hf = hgt.to(COMPUTE)
            x = tl.minimum(tl.maximum(lx * wf - 0.5, -2.0), wf + 1.0)
            y = tl.minimum(tl.maximum(ly * hf - 0.5, -2.0), hf + 1.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            # Do all queries of the block share (x0, y0) for every point? Then every
            # corner row is shared too. Padded points load loc 0 for all queries.
            big = 1 << 30
            mq = mask_q[:, None]
            x_lo = tl.min(tl.where(mq, x0, big), axis=0)
            x_hi = tl.max(tl.where(mq, x0, -big), axis=0)
            y_lo = tl.min(tl.where(mq, y0, big), axis=0)
            y_hi = tl.max(tl.where(mq, y0, -big), axis=0)
            differs = ((x_lo != x_hi) | (y_lo != y_hi)).to(tl.int32)
            uniform = tl.sum(differs, axis=0) == 0
            nan_or_0 = (lx - lx) + (ly - ly)  # NaN/inf locations: NaN gradients
            ga = nan_or_0
            gx = nan_or_0
            gy = nan_or_0
            for c in tl.static_range(4):
                dx = c % 2
                dy = c // 2
                xc = x0 + dx
                yc = y0 + dy
                valid = mask_qp & (xc >= 0) & (xc < wid) & (yc >= 0) & (yc < hgt)
                wx = (1 - dx) + (2 * dx - 1) * fx
                wy = (1 - dy) + (2 * dy - 1) * fy
                rows = tl.where(valid, start + yc * wid + xc, 0).to(tl.int64)
                mask_v = valid[:, :, None] & mask_d[None, None, :]
                ptrs = v_base + rows[:, :, None] * row_stride + dd[None, None, :]
                v = tl.load(ptrs, mask=mask_v, other=0).to(COMPUTE)
                dot = tl.sum(v * g[:, None, :], axis=2)  # v_corner · grad_out, (BN, BP)
                ga += wx * wy * dot
                gx += (2 * dx - 1) * wy * dot
                gy += (2 * dy - 1) * wx * dot
                wv = tl.where(valid, a * wx * wy, 0.0)
                if uniform:
                    part = tl.sum(wv[:, :, None] * g[:, None, :], axis=0)  # (BP, BD)
                    row1 = tl.max(tl.where(valid, rows, -1), axis=0)
                    ok1 = (row1 >= 0)[:, None] & mask_d[None, :]
                    ptr1 = gv_base + tl.maximum(row1, 0)[:, None] * row_stride + dd[None, :]
                    tl.atomic_add(ptr1, part, mask=ok1, sem="relaxed")
                else:
                    gptrs = gv_base + rows[:, :, None] * row_stride + dd[None, None, :]
                    tl.atomic_add(gptrs, wv[:, :, None] * g[:, None, :], mask=mask_v,
                                  sem="relaxed")
            tl.store(grad_attn_ptr + off, (ga * seen).to(grad_attn_ptr.dtype.element_ty),
                     mask=mask_qp)
            tl.store(grad_loc_ptr + 2 * off, (a * gx * wf).to(grad_loc_ptr.dtype.element_ty),
                     mask=mask_qp)
            tl.store(grad_loc_ptr + 2 * off + 1,
                     (a * gy * hf).to(grad_loc_ptr.dtype.element_ty), mask=mask_qp)
        else:
            zero = tl.zeros((BLOCK_N, BLOCK_P), dtype=COMPUTE)
            tl.store(grad_attn_ptr + off, zero.to(grad_attn_ptr.dtype.element_ty), mask=mask_qp)
            tl.store(grad_loc_ptr + 2 * off, zero.to(grad_loc_ptr.dtype.element_ty),
                     mask=mask_qp)
            tl.store(grad_loc_ptr + 2 * off + 1, zero.to(grad_loc_ptr.dtype.element_ty),
                     mask=mask_qp)
