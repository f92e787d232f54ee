"""The ``"torch"`` backend: all levels at once through gathered corner indices.

Every sample of every level becomes four (row, weight) pairs into one table of value rows
(b·h·s, dh); ``torch.nn.functional.embedding_bag`` with per-sample weights then sums them
without materialising the (n, l·p·4, dh) samples. Coordinates and bilinear weights are
computed in fp32 (fp64 for fp64 inputs); fp16/bf16 values are read into an fp32 table so
accumulation and value gradients are fp32 too, and the result is cast back once.

Memory stays bounded: queries are processed in chunks of at most ``CHUNK_BYTES`` of
index/weight state, and under autograd each chunk is wrapped in non-reentrant activation
checkpointing, so only the inputs are kept for backward and each chunk's indices are
rebuilt there. Pure PyTorch, so it runs on every device and inside ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmlayers.ops.deform_attn import (
    DeformAttnBackend,
    DeformAttnInputs,
    compute_dtype,
    float_dtype_reasons,
    register_backend,
)

__all__ = ["CHUNK_BYTES", "torch_deformable_attention"]

#: Upper bound on the index + weight state built for one chunk of queries (bytes).
CHUNK_BYTES = 256 * 2**20


def _corner_plan(
    loc: torch.Tensor,
    attn: torch.Tensor,
    size_xy: torch.Tensor,
    starts: torch.Tensor,
    base: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the value table and weights of the 4 bilinear corners of every sample.

    loc (b, q, h, l, p, 2), attn (b, q, h, l, p), size_xy (l, 1, 2) as (W, H),
    starts (l, 1), base (b, 1, h, 1, 1) = (b·h index)·s  →  idx, w of shape (b·q·h, l·p·4).
    """
    w_l, h_l = size_xy[..., 0], size_xy[..., 1]  # (l, 1)
    # Pixel coordinates, align_corners=False; clamp far-away points so that int casts stay
    # finite (all four corners of a clamped point are outside, so it still reads zero).
    x = torch.minimum(torch.maximum(loc[..., 0].to(dtype) * w_l - 0.5, w_l.new_tensor(-2.0)),
                      w_l + 1)
    y = torch.minimum(torch.maximum(loc[..., 1].to(dtype) * h_l - 0.5, h_l.new_tensor(-2.0)),
                      h_l + 1)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0i, y0i = x0.long(), y0.long()
    xs = torch.stack((x0i, x0i + 1, x0i, x0i + 1), dim=-1)  # (b, q, h, l, p, 4)
    ys = torch.stack((y0i, y0i, y0i + 1, y0i + 1), dim=-1)
    wx = torch.stack((1 - fx, fx, 1 - fx, fx), dim=-1)
    wy = torch.stack((1 - fy, 1 - fy, fy, fy), dim=-1)
    wl, hl = w_l.long()[..., None], h_l.long()[..., None]
    valid = (xs >= 0) & (xs < wl) & (ys >= 0) & (ys < hl)
    idx = base[..., None] + starts[..., None] + ys * wl + xs
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    weight = attn.to(dtype)[..., None] * wx * wy * valid.to(dtype)
    n_bags = idx.shape[0] * idx.shape[1] * idx.shape[2]
    return idx.reshape(n_bags, -1), weight.reshape(n_bags, -1)


def _chunk(table, loc, attn, size_xy, starts, base, dtype):
    idx, weight = _corner_plan(loc, attn, size_xy, starts, base, dtype)
    return F.embedding_bag(idx, table, per_sample_weights=weight, mode="sum")


def torch_deformable_attention(inputs: DeformAttnInputs, chunk_bytes: int | None = None
                               ) -> torch.Tensor:
    """Gather + ``embedding_bag`` implementation; see the module docstring."""
    value, loc, attn = inputs.value, inputs.sampling_locations, inputs.attention_weights
    b, s, h, dh = value.shape
    n, n_levels, p = loc.shape[1], loc.shape[3], loc.shape[4]
    dtype = compute_dtype(value, loc, attn)
    device = value.device
    # (b·h·s, dh) table in the compute dtype; one copy of value.
    table = value.permute(0, 2, 1, 3).reshape(b * h * s, dh).to(dtype)
    size_xy = torch.tensor([(w, hh) for hh, w in inputs.shapes], dtype=dtype,
                           device=device).view(n_levels, 1, 2)
    starts = torch.tensor(inputs.starts, dtype=torch.long, device=device).view(n_levels, 1)
    base = (torch.arange(b * h, device=device, dtype=torch.long) * s).view(b, 1, h, 1, 1)
    per_query = b * h * n_levels * p * 4 * (8 + torch.finfo(dtype).bits // 8 * 4)
    q_chunk = max(1, (chunk_bytes or CHUNK_BYTES) // per_query)
    use_ckpt = torch.is_grad_enabled() and (
        value.requires_grad or loc.requires_grad or attn.requires_grad)
    outs = []
    for q0 in range(0, n, q_chunk):
        args = (table, loc[:, q0:q0 + q_chunk], attn[:, q0:q0 + q_chunk], size_xy, starts,
                base, dtype)
        if use_ckpt and q_chunk < n:
            out = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            out = _chunk(*args)
        outs.append(out.view(b, -1, h * dh))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.to(value.dtype)


register_backend(DeformAttnBackend(
    name="torch",
    run=torch_deformable_attention,
    not_supported_reasons=float_dtype_reasons,
    priority=10,
))
