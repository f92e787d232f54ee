"""Value layout of the feature synchronizer: all images of a row as one "tall" map per level.

Shape key: b batch · m images · l pyramid levels · s flattened tokens of one image's pyramid
(Σ_l size_l²) · S rows of the tall layout (Σ_l m·(size_l + 1)·size_l) · h heads ·
dh head width · d = h·dh.

[`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer] reads every image a query sees
with one deformable-attention call. For that, level ``l`` of the m images of a row is
stacked vertically into one map of ``m·(size_l + 1)`` rows and ``size_l`` columns, with a
zero row under each image, so that a bilinear sample that leaves its image at the top or
the bottom reads the zero row (what zero padding gives it in the official op) and never
the neighbouring image. The levels follow one another, and the values are stored head-major
``(b, h, S, dh)``, the table layout of the ``"torch"`` deformable-attention backend, so the
op reads them without a copy.

Building the layout costs one copy of the values (and one in the backward pass);
[`PreparedValues`][mmlayers.layers._sync_layout.PreparedValues] lets a caller do it once and reuse it (e.g. every decoding step of
one prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange

__all__ = ["PreparedValues", "segment_softmax", "tall_layout"]


def _blocks(level_sizes: Sequence[int], m: int):
    """(size, start in s, start in S) per level."""
    s0 = t0 = 0
    for size in level_sizes:
        yield size, s0, t0
        s0 += size * size
        t0 += m * (size + 1) * size


class _TallLayout(torch.autograd.Function):
    """(b, m, s, d) values → (b, h, S, dh) tall maps; one copy forward, one backward."""

    @staticmethod
    def forward(ctx, values, level_sizes, heads):
        b, m, s, d = values.shape
        rows = sum(m * (x + 1) * x for x in level_sizes)
        out = values.new_empty(b, heads, rows, d // heads)
        ctx.level_sizes, ctx.shape = level_sizes, (b, m, s, d)
        if m == 0:  # no images: an empty table (every query then reads nothing)
            return out
        for size, s0, t0 in _blocks(level_sizes, m):
            dst = out[:, :, t0:t0 + m * (size + 1) * size].view(b, heads, m, size + 1, size, -1)
            dst[:, :, :, size].zero_()
            dst[:, :, :, :size].copy_(rearrange(
                values[:, :, s0:s0 + size * size], "b m (H W) (h dh) -> b h m H W dh",
                H=size, h=heads))
        return out

    @staticmethod
    def backward(ctx, grad):
        b, m, s, d = ctx.shape
        heads = grad.shape[1]
        out = grad.new_empty(b, m, s, d)
        if m == 0:
            return out, None, None
        for size, s0, t0 in _blocks(ctx.level_sizes, m):
            src = grad[:, :, t0:t0 + m * (size + 1) * size].reshape(
                b, heads, m, size + 1, size, -1)[:, :, :, :size]
            out[:, :, s0:s0 + size * size].view(b, m, size, size, heads, -1).copy_(
                rearrange(src, "b h m H W dh -> b m H W h dh"))
        return out, None, None


def tall_layout(values: torch.Tensor, level_sizes: Sequence[int], heads: int) -> torch.Tensor:
    """Stack the images of each row into per-level tall maps with a zero row under each.

    Args:
        values: (b, m, s, d) projected values, levels flattened row-major and concatenated
            in ``level_sizes`` order.
        level_sizes: side of each square level.
        heads: h; ``d`` must be divisible by it.

    Returns:
        (b, h, S, dh), S = Σ_l m·(size_l + 1)·size_l: row ``k·(size_l + 1) + i`` of level
        ``l`` is row ``i`` of image ``k`` (``i < size_l``) or zero (``i = size_l``).
        Differentiable.

    Examples:
        >>> import torch
        >>> v = torch.arange(2 * 5 * 2.0).view(1, 2, 5, 2)   # m=2, levels 2² and 1², d=2
        >>> tall_layout(v, (2, 1), heads=1)[0, 0, :, 0].tolist()
        [0.0, 2.0, 4.0, 6.0, 0.0, 0.0, 10.0, 12.0, 14.0, 16.0, 0.0, 0.0, 8.0, 0.0, 18.0, 0.0]
    """
    return _TallLayout.apply(values, tuple(level_sizes), heads)


@dataclass(frozen=True, eq=False)
class PreparedValues:
    """Projected image values in the synchronizer's sampling layout, built once, reused.

    Made by [`FeatureSynchronizer.prepare_values`][mmlayers.layers.synchronizer.FeatureSynchronizer.prepare_values]; pass it as
    ``values=`` to ``forward``. It carries its autograd history: prepared under
    ``torch.no_grad()`` it is a constant; prepared with grad, gradients reach the features
    (build it again for every training step).

    Attributes:
        tall: (b, h, S, dh) tall maps, S = Σ_l m·(size_l + 1)·size_l (see
            `tall_layout`).
        images: m, images per row.
        level_sizes: side of each square level.
    """

    tall: torch.Tensor
    images: int
    level_sizes: tuple[int, ...]

    @property
    def batch(self) -> int:
        """b, rows of images."""
        return self.tall.shape[0]

    @property
    def heads(self) -> int:
        return self.tall.shape[1]

    @property
    def dim(self) -> int:
        """d = h·dh."""
        return self.tall.shape[1] * self.tall.shape[3]

    def value(self) -> torch.Tensor:
        """(b, S, h, dh) view in the deformable-attention ``value`` layout."""
        return self.tall.transpose(1, 2)

    def spatial_shapes(self) -> list[tuple[int, int]]:
        """(H, W) of each level's tall map: (m·(size + 1), size)."""
        return [(self.images * (x + 1), x) for x in self.level_sizes]

    def index_select(self, index: torch.Tensor) -> PreparedValues:
        """Rows ``index`` of the batch (e.g. every row repeated for beams): (b',) long."""
        return PreparedValues(self.tall.index_select(0, index.to(self.tall.device)),
                              self.images, self.level_sizes)


def segment_softmax(logit: torch.Tensor, segment: torch.Tensor, n_segments: int
                    ) -> torch.Tensor:
    """Softmax over all entries of each segment plus one null entry of logit 0.

    logit (P, h, k), segment (P,) ids in [0, n_segments) → (P, h, k): for each (segment,
    head), ``exp(logit) / (1 + Σ_{rows of the segment} Σ_k exp(logit))``, computed stably.

    Examples:
        >>> import torch
        >>> w = segment_softmax(torch.zeros(3, 1, 2), torch.tensor([0, 0, 1]), 2)
        >>> [round(x, 4) for x in w[:, 0, 0].tolist()]   # 4 entries + null; 2 + null
        [0.2, 0.2, 0.3333]
    """
    peak = logit.detach().amax(-1)  # (P, h)
    shift = peak.new_zeros(n_segments, peak.shape[1]).scatter_reduce_(
        0, segment[:, None].expand_as(peak), peak, "amax")  # ≥ 0: includes the null entry
    e = (logit - shift.index_select(0, segment)[..., None]).exp()
    denom = (-shift).exp().index_add(0, segment, e.sum(-1))
    return e / denom.index_select(0, segment)[..., None]
