"""The ``"torch"`` backend: all levels at once through gathered corner indices.

Every sample becomes four (row, weight) pairs into one table of value rows (b·h·s, dh),
and ``torch.nn.functional.embedding_bag`` with per-sample weights sums them without
materialising the (n, l·p·4, dh) samples. The backward pass is written out by hand with
the same primitive, because the generic ``embedding_bag`` backward is slow on CPU:

* value gradient: the transposed bag. Corner entries are sorted by table row once and
  one ``embedding_bag`` over the output gradients sums, for every row, the weighted
  gradients of the queries that read it (no atomics, no (n, l·p·4, dh) buffer).
* location and weight gradients: for each sample, three 4-row bags of the value table
  with the bilinear weights and their x / y derivatives, dotted with the output
  gradient of the query.

Coordinates, bilinear weights and all accumulation are fp32 (fp64 for fp64 inputs);
fp16/bf16 values are read into an fp32 table and results are cast back once. Queries are
processed in chunks of at most ``CHUNK_BYTES`` of working state and only the inputs are
saved for backward, so memory stays bounded in training too. Pure PyTorch: it runs on
every device and inside ``torch.compile``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from mmlayers.ops.deform_attn import (
    DeformAttnBackend,
    DeformAttnInputs,
    compute_dtype,
    float_dtype_reasons,
    register_backend,
)

__all__ = ["CHUNK_BYTES", "torch_deformable_attention"]

#: Upper bound on the working state built for one chunk of queries (bytes).
CHUNK_BYTES = 128 * 2**20


class _Levels:
    """Per-level constants of one call, built once: sizes and corner row offsets."""

    def __init__(self, value, shapes, starts, dtype):
        b, s, h, _ = value.shape
        device = value.device
        n_levels = len(shapes)
        # int32 rows when they fit: half the index traffic, and every kernel used takes them.
        self.index_dtype = torch.int32 if b * h * s < 2**31 else torch.long
        self.size_x = torch.tensor([w for _, w in shapes], dtype=dtype,
                                   device=device).view(n_levels, 1)
        self.size_y = torch.tensor([hh for hh, _ in shapes], dtype=dtype,
                                   device=device).view(n_levels, 1)
        self.width = torch.tensor([w for _, w in shapes], dtype=self.index_dtype,
                                  device=device).view(n_levels, 1)
        # corners (x0 y0, x1 y0, x0 y1, x1 y1) of a sample are rows r, r + 1, r + w, r + w + 1
        self.start = torch.tensor(list(starts), dtype=self.index_dtype,
                                  device=device).view(n_levels, 1)
        self.s, self.n_rows = s, b * h * s
        self._cache: dict = {}

    def _memo(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def per_sample(self, axis: int, p: int):
        """(size, size + 1, size − 1) along ``axis`` per (level, point): three (l·p,)."""
        def make():
            size = (self.size_x if axis == 0 else self.size_y).expand(-1, p).reshape(-1)
            return size.contiguous(), size + 1, size - 1
        return self._memo(("axis", axis, p), make)

    def width_lp(self, p: int) -> torch.Tensor:
        return self._memo(("width", p), lambda: self.width.expand(-1, p).reshape(-1).contiguous())

    def start_lp(self, p: int) -> torch.Tensor:
        """(l·p,) first row of each sample's level."""
        return self._memo(("start", p), lambda: self.start.expand(-1, p).reshape(-1).contiguous())

    def bag_base(self, b: int, q: int, h: int) -> torch.Tensor:
        """(b·q·h, 1) first table row of each bag's (batch, head) block."""
        def make():
            base = torch.arange(b * h, device=self.width.device, dtype=self.index_dtype) * self.s
            return base.view(b, 1, h).expand(b, q, h).reshape(-1, 1)
        return self._memo(("base", b, q, h), make)


class _Geometry:
    """Corner rows and bilinear factors of the samples of one chunk of queries.

    loc (b, q, h, l, p, 2) → ``idx`` (b·q·h, l·p, 4) table rows, corners ordered
    (x0 y0, x1 y0, x0 y1, x1 y1). Per axis, flat (b·q·h, l·p) tensors: ``w0x``/``w1x``
    the weights of the left/right corner (zero outside the map) and ``v0x``/``v1x`` their
    validity, which is also |d w / d x|; the same for y. Everything is computed on
    (b·q·h, l·p) arrays with per-(level, point) constants of l·p entries: broadcasts over
    tiny innermost dimensions (``(l, 1)`` against ``(…, l, p)``) are ~10× slower on the CPU.
    """

    def __init__(self, loc, lv: _Levels, dtype):
        b, q, h, n_levels, p = loc.shape[:5]
        n_bags, lp = b * q * h, n_levels * p
        flat = loc.reshape(n_bags, lp, 2)
        rows, parts = None, []
        for axis in (0, 1):
            size, high, size_m1 = lv.per_sample(axis, p)
            # Pixel coordinates (align_corners=False). Far-away points are clamped so that
            # integer casts stay finite; all four corners of a clamped point are outside.
            c = torch.minimum((flat[..., axis].to(dtype) * size - 0.5).clamp_(min=-2.0), high)
            c0 = c.floor()
            frac = c - c0
            # validity along the axis: 0 <= c0 <= size - 1 and -1 <= c0 <= size - 2
            v0 = ((c0 >= 0) & (c0 < size)).to(dtype)
            v1 = ((c0 >= -1) & (c0 < size_m1)).to(dtype)
            w0, w1 = (1 - frac).mul_(v0), frac.mul_(v1)
            parts.append((w0, w1, v0, v1))
            i0 = c0.to(lv.index_dtype)
            rows = i0 + lv.bag_base(b, q, h) if axis == 0 else rows.add_(i0 * lv.width_lp(p))
        (self.w0x, self.w1x, self.v0x, self.v1x), (self.w0y, self.w1y, self.v0y, self.v1y) = parts
        top = rows.add_(lv.start_lp(p))
        bottom = top + lv.width_lp(p)
        idx = torch.stack((top, top + 1, bottom, bottom + 1), dim=-1)  # (b·q·h, l·p, 4)
        self.idx = idx.clamp_(0, lv.n_rows - 1)

    def corner_weights(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Bilinear weight of each corner, times ``scale`` (b·q·h, l·p) → (b·q·h, l·p, 4)."""
        w0y, w1y = (self.w0y, self.w1y) if scale is None else (self.w0y * scale,
                                                               self.w1y * scale)
        return torch.stack((w0y * self.w0x, w0y * self.w1x, w1y * self.w0x, w1y * self.w1x),
                           dim=-1)


def _query_chunk(b, h, n_levels, p, dh, dtype, chunk_bytes):
    item = torch.finfo(dtype).bits // 8
    # Per query and sample: 4 corners × (row, sort key, order, bag id, ~4 weights) and, when
    # the corner dots cannot use SDDMM (torch.compile), the gathered rows.
    per_corner = 8 * 4 + item * 4 + (item * dh if torch.compiler.is_compiling() else 0)
    per_query = b * h * n_levels * p * 4 * per_corner
    return max(1, chunk_bytes // per_query)


class _GatherDeformAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, loc, attn, shapes, starts, chunk_bytes):
        b, s, h, dh = value.shape
        n, n_levels, p = loc.shape[1], loc.shape[3], loc.shape[4]
        dtype = compute_dtype(value, loc, attn)
        table = value.permute(0, 2, 1, 3).reshape(b * h * s, dh).to(dtype)
        levels = _Levels(value, shapes, starts, dtype)
        q_chunk = _query_chunk(b, h, n_levels, p, dh, dtype, chunk_bytes)
        outs = []
        for q0 in range(0, n, q_chunk):
            geo = _Geometry(loc[:, q0:q0 + q_chunk], levels, dtype)
            a = attn[:, q0:q0 + q_chunk].to(dtype).reshape(geo.idx.shape[:2])
            weight = geo.corner_weights(a)
            out = F.embedding_bag(geo.idx.flatten(1), table, per_sample_weights=weight.flatten(1),
                                  mode="sum")
            outs.append(out.view(b, -1, h * dh))
        ctx.save_for_backward(value, loc, attn)
        ctx.shapes, ctx.starts, ctx.chunk_bytes = shapes, starts, chunk_bytes
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out.to(value.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        value, loc, attn = ctx.saved_tensors
        b, s, h, dh = value.shape
        n, n_levels, p = loc.shape[1], loc.shape[3], loc.shape[4]
        dtype = compute_dtype(value, loc, attn)
        need_v, need_loc, need_attn = ctx.needs_input_grad[:3]
        table = value.permute(0, 2, 1, 3).reshape(b * h * s, dh).to(dtype)
        levels = _Levels(value, ctx.shapes, ctx.starts, dtype)
        g_all = grad_out.to(dtype).reshape(b, n, h, dh)
        grad_table = None
        grad_loc, grad_attn = [], []
        q_chunk = _query_chunk(b, h, n_levels, p, dh, dtype, ctx.chunk_bytes)
        # sort keys: int16 when the table is small enough (a faster radix sort on the CPU)
        key_dtype = torch.int16 if levels.n_rows <= 2**15 - 1 else levels.index_dtype
        rows = torch.arange(levels.n_rows, device=value.device, dtype=key_dtype)
        for q0 in range(0, n, q_chunk):
            loc_c = loc[:, q0:q0 + q_chunk]
            geo = _Geometry(loc_c, levels, dtype)
            n_bags, lp = geo.idx.shape[:2]
            g = g_all[:, q0:q0 + q_chunk].reshape(n_bags, dh)
            a = attn[:, q0:q0 + q_chunk].to(dtype).reshape(n_bags, lp)
            if need_v:
                # Transposed bag: sort corner entries by row, sum weighted query grads.
                weight = geo.corner_weights(a).flatten()
                sorted_rows, order = torch.sort(geo.idx.flatten().to(key_dtype), stable=True)
                offsets = torch.searchsorted(sorted_rows, rows)
                bag_of = torch.div(order, lp * 4, rounding_mode="floor").to(offsets.dtype)
                part = F.embedding_bag(bag_of, g, offsets, per_sample_weights=weight[order],
                                       mode="sum")
                grad_table = part if grad_table is None else grad_table.add_(part)
            if need_loc or need_attn:
                # d[y, x] = <V[row of corner (x, y)], g>: the gradient of each corner weight.
                d = _corner_dots(table, geo.idx, g, pattern_values=weight if need_v else None)
                d00, d01, d10, d11 = d.unbind(-1)  # corners (x0 y0, x1 y0, x0 y1, x1 y1)
                row0 = d00 * geo.w0x + d01 * geo.w1x  # interpolated along x, top row
                row1 = d10 * geo.w0x + d11 * geo.w1x
                grad_attn.append((row0 * geo.w0y + row1 * geo.w1y)
                                 .reshape(attn[:, q0:q0 + q_chunk].shape))
                if need_loc:
                    # d w1x / dx = +v1x, d w0x / dx = -v0x (per unit pixel), same for y;
                    # pixel = loc · size - 0.5, so d / d loc = size · d / d pixel.
                    dx = (geo.w0y * (d01 * geo.v1x - d00 * geo.v0x)
                          + geo.w1y * (d11 * geo.v1x - d10 * geo.v0x))
                    dy = row1 * geo.v1y - row0 * geo.v0y
                    sx = levels.size_x.expand(n_levels, p).reshape(1, lp)
                    sy = levels.size_y.expand(n_levels, p).reshape(1, lp)
                    d_xy = torch.stack((dx * sx, dy * sy), -1).mul_(a[..., None])
                    grad_loc.append(d_xy.reshape(loc_c.shape))
        grad_value = None
        if need_v:
            grad_value = grad_table.view(b, h, s, dh).permute(0, 2, 1, 3).to(value.dtype)
        g_loc = torch.cat(grad_loc, dim=1).to(loc.dtype) if need_loc else None
        g_attn = torch.cat(grad_attn, dim=1).to(attn.dtype) if need_attn else None
        return grad_value, g_loc, g_attn, None, None, None


def _corner_dots(table: torch.Tensor, idx: torch.Tensor, g: torch.Tensor,
                 pattern_values: torch.Tensor | None = None) -> torch.Tensor:
    """``out[n, j, c] = <table[idx[n, j, c]], g[n]>`` for idx (bags, lp, 4), g (bags, dh).

    A sampled dense-dense matmul (SDDMM) over the corner pattern when the device has one,
    else a gather (materialises (bags, lp, 4, dh); used under ``torch.compile``, which does
    not trace sparse tensors). ``pattern_values`` is any finite tensor of ``idx.numel()``
    elements to reuse as the pattern's values, which ``beta=0`` ignores.
    """
    n_bags, k = idx.shape[0], idx.shape[1] * idx.shape[2]
    if table.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
        crow = torch.arange(0, n_bags * k + 1, k, device=idx.device, dtype=idx.dtype)
        with warnings.catch_warnings():  # "sparse CSR support is in beta" is not for users
            warnings.simplefilter("ignore")
            values = pattern_values if pattern_values is not None else table.new_zeros(n_bags * k)
            pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), values,
                                              size=(n_bags, table.shape[0]))
            out = torch.sparse.sampled_addmm(pattern, g, table.t(), beta=0.0)
        return out.values().view(idx.shape)
    return torch.einsum("njcd,nd->njc", F.embedding(idx.long(), table), g)


def torch_deformable_attention(inputs: DeformAttnInputs, chunk_bytes: int | None = None
                               ) -> torch.Tensor:
    """Gather + ``embedding_bag`` implementation; see the module docstring."""
    return _GatherDeformAttn.apply(inputs.value, inputs.sampling_locations,
                                   inputs.attention_weights, inputs.shapes, inputs.starts,
                                   chunk_bytes or CHUNK_BYTES)


#: On the CPU, forward+backward at head widths up to this is faster with the per-level
#: ``grid_sample`` reference (measured with ``python recipes/benchmark.py ops --sweep-dh``).
CPU_REFERENCE_MAX_HEAD_DIM = 8


def _auto_declines(inputs: DeformAttnInputs) -> list[str]:
    """Why ``"auto"`` leaves these inputs to the reference backend (empty: it takes us)."""
    v = inputs.value
    dh = v.shape[-1]
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (v, inputs.sampling_locations, inputs.attention_weights))
    if v.device.type == "cpu" and grad and dh <= CPU_REFERENCE_MAX_HEAD_DIM:
        return [f"on the CPU, forward+backward at head width {dh} <= "
                f"{CPU_REFERENCE_MAX_HEAD_DIM} is faster with the reference backend"]
    return []


register_backend(DeformAttnBackend(
    name="torch",
    run=torch_deformable_attention,
    not_supported_reasons=float_dtype_reasons,
    priority=10,
    auto_declines=_auto_declines,
))
