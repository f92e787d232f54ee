"""One UNet feature map reads the previous image's pyramid (the UNet's MMFS block).

Shape key: b batch · s flattened tokens of one image's pyramid (Σ_l size_l²) · d width ·
dv pyramid width · c channels · H W feature-map height and width.

For a feature map ``x`` (b, c, H, W) (official ``MMFSBlock``)::

    q        = LayerNorm(x as (b, H·W, c)) + sincos_2d(H, W, c; frame = grid_size)
    ref      = ((j + 0.5) / W, (i + 0.5) / H)                       # own pixel centre
    residual = Conv1x1(FeatureSynchronizer(q, LayerNorm(pyramid), ref))  # zero-init conv

Offsets are measured in cells of the query map (``base_size`` = ``size``). The official
block's query position table is a 2-D sincos table of the latent size, resized bicubically
to smaller maps; this block evaluates the sincos formula exactly at the same
(pixel-centre-aligned) coordinates. ``pos_table="official"`` uses the official table
instead: a stored ``[y|x]`` table of the square ``grid_size`` (persistent buffer
``pos_embed``, loadable from an official checkpoint), resized bicubically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from mmlayers.layers.posembed import (
    accept_stored_table,
    official_sincos_2d,
    resize_pos_table,
    sincos_2d,
)
from mmlayers.layers.synchronizer import FeatureSynchronizer

__all__ = ["SkipSynchronizer"]


class SkipSynchronizer(nn.Module):
    """One UNet feature map reads the previous image's pyramid (module docstring formula).

    Args:
        channels: c of the feature map (query width and output width); a multiple of 4.
        value_dim: dv of the pyramid.
        size: side of the feature map in the reference layout (offset ``base_size``).
        grid_size: (H0, W0) frame of the position table (the UNet's sample size).
        dim: ``dim`` of the [`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer].
        heads: ``heads`` of the [`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer].
        points: ``points`` of the [`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer].
        level_sizes: ``level_sizes`` of the [`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer].
        offset_init: ``offset_init`` of the [`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer].
        max_images: ``max_images`` of the [`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer].
        backend: ``backend`` of the [`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer].
        query_chunk: ``query_chunk`` of the [`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer].
        eps: LayerNorm epsilon (1e-6 as the official block).
        pos_table: ``"exact"`` (default): the sincos formula at each map's pixel centres;
            ``"official"``: the stored official table of the ``grid_size`` grid (square),
            bicubically resized to the map ([`resize_pos_table`][mmlayers.layers.posembed.resize_pos_table]).
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Shapes:
        ``forward(x (b, c, H, W), values (b, 1, s, d) or None, has_image (b,) bool)`` →
        residual (b, c, H, W); ``values=None`` means no image in the batch.

    Examples:
        >>> import torch
        >>> blk = SkipSynchronizer(channels=8, value_dim=6, size=4, grid_size=(4, 4), dim=8,
        ...                        heads=2, points=2, level_sizes=(4, 2))
        >>> values = blk.project_values(torch.randn(2, 1, 20, 6))
        >>> r = blk(torch.randn(2, 8, 4, 4), values, torch.tensor([True, False]))
        >>> r.shape, r.abs().max().item()  # zero-initialised conv: starts as the identity
        (torch.Size([2, 8, 4, 4]), 0.0)
    """

    def __init__(self, *, channels: int, value_dim: int, size: int,
                 grid_size: tuple[int, int], dim: int = 1024, heads: int = 16, points: int = 8,
                 level_sizes: Sequence[int] = (64, 32, 16, 8), offset_init: float = 1.0,
                 max_images: int = 10, eps: float = 1e-6, backend: str | None = None,
                 query_chunk: int | None = None, pos_table: str = "exact",
                 device=None, dtype=None) -> None:
        super().__init__()
        if pos_table not in ("exact", "official"):
            raise ValueError(f"pos_table must be 'exact' or 'official', got {pos_table!r}")
        if pos_table == "official" and grid_size[0] != grid_size[1]:
            raise ValueError(f"pos_table='official' needs a square grid_size, got {grid_size}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 4 \
                or channels % 4:
            raise ValueError(f"channels must be a positive multiple of 4 (2-D sincos), "
                             f"got {channels!r}")
        kw = {"device": device, "dtype": dtype}
        self.channels, self.grid_size = channels, tuple(grid_size)
        self.query_norm = nn.LayerNorm(channels, eps=eps, **kw)
        self.value_norm = nn.LayerNorm(value_dim, eps=eps, **kw)
        self.sync = FeatureSynchronizer(
            dim=dim, query_dim=channels, value_dim=value_dim, out_dim=channels, heads=heads,
            points=points, level_sizes=level_sizes, base_size=size, offset_init=offset_init,
            max_images=max_images, backend=backend, query_chunk=query_chunk, **kw)
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, **kw)
        self.pos_table = pos_table
        if pos_table == "official":
            self.register_buffer("pos_embed", official_sincos_2d(int(grid_size[0]), channels)
                                 .to(device))
            accept_stored_table(self, "pos_embed")  # a stored table of another grid loads too
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Norms (1, 0), the synchronizer's official init, conv weight and bias zero."""
        self.query_norm.reset_parameters()
        self.value_norm.reset_parameters()
        self.sync.reset_parameters()
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def project_values(self, pyramid: torch.Tensor) -> torch.Tensor:
        """(b, 1, s, dv) pyramid → (b, 1, s, d) values (LayerNorm, then ``value_proj``)."""
        return self.sync.project_values(self.value_norm(pyramid))

    def _position(self, h: int, w: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h, w, device, dtype)
        if key not in self._tables:
            pos = sincos_2d(h, w, self.channels, base_size=self.grid_size, device=device,
                            dtype=dtype)
            ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
            xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            ref = rearrange(torch.stack((xx, yy), -1), "H W xy -> 1 (H W) xy")
            self._tables[key] = (pos, ref)
        return self._tables[key]

    def forward(self, x: torch.Tensor, values: torch.Tensor | None,
                has_image: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        b, c, h, w = x.shape
        wdt = self.conv.weight.dtype
        if values is None:  # no image anywhere: attention reads only the zero ignore value
            const = self.conv(self.sync.output_proj.bias.reshape(1, c, 1, 1))
            return const.expand(b, c, h, w).to(x.dtype)
        pos, ref = self._position(h, w, x.device, wdt)
        if self.pos_table == "official":
            pos = resize_pos_table(self.pos_embed, (h, w))
        q = self.query_norm(rearrange(x.to(wdt), "b c H W -> b (H W) c")) + pos
        out = self.sync(q, values=values, visibility=has_image[:, None], reference_points=ref)
        return self.conv(rearrange(out, "b (H W) c -> b c H W", H=h)).to(x.dtype)
