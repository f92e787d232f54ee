"""Deformable-DETR multi-scale deformable attention as a layer (one image per row).

Shape key: b batch · n queries · s flattened value tokens · l levels · h heads ·
p points · d width · dh head width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from mmlayers.ops.deform_attn import ShapesLike, _as_shapes, multi_scale_deformable_attention

__all__ = ["MultiScaleDeformableAttention"]


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to ``num_points`` learned locations per head and level.

    For every query the layer predicts, per head ``h``, level ``l`` and point ``p``, an
    offset Δ (in pixels of that level) from the query's reference point and a weight
    (softmax over the l·p samples of the head); the output is the weighted sum of the
    bilinearly sampled, projected values (Zhu et al., "Deformable DETR", 2021)::

        loc = ref[b, n, l] + Δ[b, n, h, l, p] / (W_l, H_l)        # 2-d reference points
        loc = ref[..., :2] + Δ / p · ref[..., 2:] / 2              # 4-d reference boxes
        out = output_proj(MSDA(value_proj(value), loc, softmax(A)))

    Initialisation follows Deformable DETR: offset weights zero and offset biases on a
    circle of ``num_heads`` directions (point ``i`` at radius ``i + 1``), attention
    weights zero (uniform attention), value/output projections xavier-uniform with zero
    bias.

    Args:
        dim: query width d.
        num_heads: heads h; ``int(dim * ratio)`` must be divisible by it.
        num_levels: feature levels l.
        num_points: sampling points p per head and level.
        value_dim: width of ``value`` (default ``dim``).
        out_dim: output width (default ``dim``).
        ratio: the attention width is ``int(dim * ratio)`` (ViT-Adapter uses 0.5).
        backend: op backend (see [`mmlayers.ops.multi_scale_deformable_attention`][mmlayers.ops.deform_attn.multi_scale_deformable_attention]).
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Shapes:
        query (b, n, d); reference_points (b, n, l, 2) as (x, y) in [0, 1], or
        (b, n, l, 4) boxes (cx, cy, w, h), or (b, n, 2) shared by all levels;
        value (b, s, value_dim); value_padding_mask (b, s) bool, True = padding
        → (b, n, out_dim).

    Examples:
        >>> import torch
        >>> from mmlayers import MultiScaleDeformableAttention
        >>> attn = MultiScaleDeformableAttention(32, num_heads=4, num_levels=2, num_points=3)
        >>> shapes = [(8, 8), (4, 4)]
        >>> value = torch.randn(2, 64 + 16, 32)
        >>> query, ref = torch.randn(2, 10, 32), torch.rand(2, 10, 2)
        >>> attn(query, ref, value, shapes).shape
        torch.Size([2, 10, 32])
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        value_dim: int | None = None,
        out_dim: int | None = None,
        ratio: float = 1.0,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        inner = int(dim * ratio)
        if inner % num_heads != 0:
            raise ValueError(
                f"int(dim * ratio) = {inner} must be divisible by num_heads = {num_heads}"
            )
        for name, v in (("num_heads", num_heads), ("num_levels", num_levels),
                        ("num_points", num_points)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.dim, self.num_heads, self.num_levels, self.num_points = (
            dim, num_heads, num_levels, num_points)
        self.value_dim = value_dim or dim
        self.out_dim = out_dim or dim
        self.inner_dim = inner
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2, **kw)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points, **kw)
        self.value_proj = nn.Linear(self.value_dim, inner, **kw)
        self.output_proj = nn.Linear(inner, self.out_dim, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation (see the class docstring)."""
        h, l, p = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(h, dtype=torch.float64) * (2.0 * math.pi / h)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(h, 1, 1, 2).repeat(1, l, p, 1)
        grid = grid * torch.arange(1, p + 1, dtype=torch.float64).view(1, 1, p, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: ShapesLike,
        level_start_index: torch.Tensor | Sequence[int] | None = None,
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See the class docstring for shapes; returns (b, n, out_dim)."""
        shapes = _as_shapes(spatial_shapes)
        self._check(query, reference_points, value, shapes, value_padding_mask)
        b, n, _ = query.shape
        h, l, p = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = rearrange(v, "b s (h dh) -> b s h dh", h=h)
        offsets = rearrange(self.sampling_offsets(query), "b n (h l p xy) -> b n h l p xy",
                            h=h, l=l, p=p)
        weights = rearrange(self.attention_weights(query), "b n (h lp) -> b n h lp", h=h)
        # Locations and weights in fp32 whatever the activation dtype (fp64 stays fp64).
        cdt = torch.float64 if query.dtype == torch.float64 else torch.float32
        weights = rearrange(weights.to(cdt).softmax(-1), "b n h (l p) -> b n h l p", l=l)
        ref = reference_points.to(cdt)
        if ref.dim() == 3:
            ref = ref[:, :, None].expand(b, n, l, 2)
        if ref.shape[-1] == 2:
            size_xy = torch.tensor([(w, hh) for hh, w in shapes], dtype=cdt,
                                   device=query.device)
            loc = ref[:, :, None, :, None] + offsets.to(cdt) / size_xy[:, None]
        else:
            loc = (ref[:, :, None, :, None, :2]
                   + offsets.to(cdt) / p * ref[:, :, None, :, None, 2:] * 0.5)
        out = multi_scale_deformable_attention(v, shapes, level_start_index, loc,
                                               weights, backend=self.backend)
        return self.output_proj(out.to(query.dtype))

    def _check(self, query, reference_points, value, shapes, value_padding_mask) -> None:
        if query.dim() != 3 or query.shape[-1] != self.dim:
            raise ValueError(f"query must have shape (b, n, {self.dim}), got {tuple(query.shape)}")
        b, n, _ = query.shape
        if value.dim() != 3 or value.shape[0] != b or value.shape[-1] != self.value_dim:
            raise ValueError(
                f"value must have shape (b={b}, s, {self.value_dim}), got {tuple(value.shape)}"
            )
        if len(shapes) != self.num_levels:
            raise ValueError(
                f"spatial_shapes has {len(shapes)} levels but the layer was built with "
                f"num_levels={self.num_levels}"
            )
        r = reference_points
        ok = (r.dim() == 3 and tuple(r.shape) == (b, n, 2)) or (
            r.dim() == 4 and tuple(r.shape[:3]) == (b, n, self.num_levels)
            and r.shape[-1] in (2, 4))
        if not ok:
            raise ValueError(
                f"reference_points must have shape (b, n, l, 2), (b, n, l, 4) or (b, n, 2) "
                f"with b={b}, n={n}, l={self.num_levels}; got {tuple(r.shape)}"
            )
        if value_padding_mask is not None and (
                value_padding_mask.dtype != torch.bool
                or tuple(value_padding_mask.shape) != tuple(value.shape[:2])):
            raise ValueError(
                f"value_padding_mask must be a bool tensor of shape {tuple(value.shape[:2])}, "
                f"got {value_padding_mask.dtype} {tuple(value_padding_mask.shape)}"
            )
