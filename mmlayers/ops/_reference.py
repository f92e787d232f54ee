"""The ``"reference"`` backend: one ``grid_sample`` per level, the test oracle.

Slow and memory-hungry (it materialises every sample), but it is the textbook formula and
is differentiable in all three inputs through PyTorch's own ``grid_sample``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from mmlayers.ops.deform_attn import (
    DeformAttnBackend,
    DeformAttnInputs,
    compute_dtype,
    float_dtype_reasons,
    register_backend,
)

__all__ = ["reference_deformable_attention"]


def reference_deformable_attention(inputs: DeformAttnInputs) -> torch.Tensor:
    """Per-level ``grid_sample`` (bilinear, zeros padding, align_corners=False)."""
    value, loc, attn = inputs.value, inputs.sampling_locations, inputs.attention_weights
    b, _, h, dh = value.shape
    n = loc.shape[1]
    dtype = compute_dtype(value, loc, attn)
    grids = 2 * loc.to(dtype) - 1  # (b, n, h, l, p, 2)
    out = value.new_zeros((b * h, dh, n), dtype=dtype)
    for lvl, ((hh, ww), start) in enumerate(zip(inputs.shapes, inputs.starts, strict=True)):
        v = value[:, start:start + hh * ww].to(dtype)
        v = rearrange(v, "b (H W) h dh -> (b h) dh H W", H=hh, W=ww)
        g = rearrange(grids[:, :, :, lvl], "b n h p xy -> (b h) n p xy")
        samples = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (b h) dh n p
        a = rearrange(attn[:, :, :, lvl].to(dtype), "b n h p -> (b h) 1 n p")
        out = out + (samples * a).sum(-1)
    return rearrange(out, "(b h) dh n -> b n (h dh)", b=b).to(value.dtype)


register_backend(DeformAttnBackend(
    name="reference",
    run=reference_deformable_attention,
    not_supported_reasons=float_dtype_reasons,
    priority=0,
))
