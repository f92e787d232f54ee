"""Multi-scale feature pyramids around a (frozen) vision transformer.

Shape key: b batch · t ViT tokens (prefix + H·W) · l levels · d width · c,H,W image;
(H, W) is the ViT's patch grid, (H_l, W_l) a level's map size.

Two ways to turn a plain ViT into the four-level pyramid that MM-Interleaved's feature
synchronizers sample from (64², 32², 16², 8² for a 16 × 16 patch grid):

- [`ViTAdapterPyramid`][mmlayers.layers.pyramid.ViTAdapterPyramid]: ViT-Adapter (Chen et al., ICLR 2023) as used by
  MM-Interleaved: a conv spatial prior on a ``16·H × 16·W`` copy of the image and one
  interaction block per group of ViT layers; the ViT's tokens change only through
  zero-initialised injectors, so the wrapped ViT is exactly itself at init.
- [`SimpleFeaturePyramid`][mmlayers.layers.pyramid.SimpleFeaturePyramid]: ViTDet's deconv / pool pyramid from the last ViT map
  (Li et al., ECCV 2022); no ViT interaction, much cheaper.

Strides in ``feature_info`` are in pixels of the adapter's frame, where one ViT patch is
16 px (the ViT-Adapter convention): level strides 4, 8, 16, 32 ↔ sizes 4H, 2H, H, H/2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmlayers.layers.hf_vit import ViTBackbone, as_vit_backbone
from mmlayers.layers.posembed import (
    accept_stored_table,
    official_sincos_2d,
    resize_pos_table,
    sincos_2d,
)
from mmlayers.layers.vit_adapter import (
    InteractionBlock,
    LayerNorm2d,
    SpatialPriorModule,
    grid_reference_points,
    resize_map,
)

__all__ = ["AdapterOutput", "SimpleFeaturePyramid", "ViTAdapterPyramid", "split_depth"]


class AdapterOutput(NamedTuple):
    """``last_hidden_state`` (b, t, d) of the adapted ViT; ``levels``: l maps (b, d, H_l, W_l)."""

    last_hidden_state: torch.Tensor
    levels: list[torch.Tensor]


def split_depth(depth: int, groups: int) -> list[tuple[int, int]]:
    """Split layers ``0 … depth−1`` into ``groups`` contiguous half-open ranges, sizes
    differing by at most one (24 layers, 4 groups → (0, 6), (6, 12), (12, 18), (18, 24))."""
    if groups < 1 or depth < groups:
        raise ValueError(f"cannot split a ViT of depth {depth} into {groups} interaction groups; "
                         f"expected 1 <= groups <= depth")
    bounds = [round(i * depth / groups) for i in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _level_pos_embeds(module: nn.Module, sizes, dim: int, grid: tuple[int, int], device,
                      pos_table: str = "exact") -> None:
    """``"exact"``: one non-persistent (d, H_l, W_l) buffer per level; ``"official"``: one
    persistent stored (H·W, d) table ``pos_table`` (square grid), resized per level."""
    if pos_table == "official":
        if grid[0] != grid[1]:
            raise ValueError(f"pos_table='official' needs a square ViT grid, got {grid}")
        module.register_buffer("pos_table", official_sincos_2d(grid[0], dim).to(device))
        accept_stored_table(module, "pos_table")  # a stored table of another grid loads too
        return
    if pos_table != "exact":
        raise ValueError(f"pos_table must be 'exact' or 'official', got {pos_table!r}")
    for i, (h, w) in enumerate(sizes):
        table = rearrange(sincos_2d(h, w, dim, base_size=grid, device=device), "(H W) d -> d H W", H=h)
        module.register_buffer(f"pos_embed_{i}", table, persistent=False)


def _level_table(module: nn.Module, i: int, size: tuple[int, int]) -> torch.Tensor:
    """The (d, H_l, W_l) position table of level ``i``."""
    stored = getattr(module, "pos_table", None)
    if isinstance(stored, torch.Tensor):
        return rearrange(resize_pos_table(stored, size), "(H W) d -> d H W", H=size[0])
    return getattr(module, f"pos_embed_{i}")


class ViTAdapterPyramid(nn.Module):
    """ViT-Adapter: a trainable pyramid that interacts with a frozen ViT's layer groups.

    Forward, with ViT grid (H, W) and prefix tokens (CLS) passed through untouched::

        img        = resize(pixels, 16H × 16W)
        c1..c4     = SPM(img)                          sizes 4H, 2H, H, ⌈H/2⌉
        c          = flatten(c2, c3, c4) + level_embed
        x          = vit.embed(pixels)
        for g, block in enumerate(blocks):             one block per layer group
            x  = x + gamma_g · MSDA(x → c)             gamma_g = 0 at init
            x  = vit.layers[group g](x)
            c  = c + MSDA(c → x) + ConvFFN(c)          (last block: 2 more extractors)
            x_g = map(x)
        levels = [c1 + up(c2) + resize(x_1),  c2 + resize(x_2),  c3 + x_3,  c4 + resize(x_4)]
                 (+ fixed 2-D sincos per level, coordinates in ViT-grid cells)
        last_hidden_state = vit.final_norm(x)

    Level ``i`` adds the ViT map of block ``⌈(i+1)·g/4⌉ − 1`` of the ``g`` blocks (block
    ``i`` for the default ``g = 4``). The ViT is not owned: ``forward`` receives it (a Hugging Face vision model or a
    [`ViTBackbone`][mmlayers.layers.hf_vit.ViTBackbone]), so this module's state dict holds only
    adapter weights. With fewer than 4 layers per group the groups follow
    [`split_depth`][mmlayers.layers.pyramid.split_depth]; pass ``interaction_indexes`` to choose them.

    Args:
        dim: ViT width d (pyramid channels).
        grid_size: ViT patch grid (H, W).
        depth: number of ViT layers.
        num_heads: deformable-attention heads (ViT-Adapter: the ViT's heads).
        num_interactions: layer groups / interaction blocks (4).
        interaction_indexes: explicit half-open ``(start, end)`` groups covering the depth.
        num_points: deformable sampling points (4).
        ratio: deformable-attention width / dim (0.5).
        ffn_ratio: ConvFFN width / dim (0.25).
        num_extra_extractors: extra extractors in the last block (2).
        inplanes: spatial-prior stem width (64).
        in_chans: image channels.
        pos_embed: add the fixed 2-D sincos table to every level.
        pos_table: ``"exact"``: [`sincos_2d`][mmlayers.layers.posembed.sincos_2d] at each level's
            cell centres in ViT-grid coordinates; ``"official"``: the official stored
            ``[y|x]`` table of the ViT grid (persistent buffer ``pos_table``, loadable from
            a checkpoint), bicubically resized to each level
            ([`resize_pos_table`][mmlayers.layers.posembed.resize_pos_table]).
        spm_eps: epsilon of the spatial prior's channel LayerNorms (official: 1e-6).
        norm_layer: normalisation class of the interaction blocks.
        act_layer: activation class of the interaction blocks.
        backend: deformable-attention op backend.
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Shapes:
        pixel_values (b, c, H·p, W·p) already normalised for the ViT →
        last_hidden_state (b, t, d), levels [(b, d, 4H, 4W), (b, d, 2H, 2W), (b, d, H, W),
        (b, d, ⌈H/2⌉, ⌈W/2⌉)].

    Examples:
        >>> import torch
        >>> from transformers import CLIPVisionConfig, CLIPVisionModel
        >>> from mmlayers.layers.pyramid import ViTAdapterPyramid
        >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        ...                        num_attention_heads=4, image_size=32, patch_size=8)
        >>> vit = CLIPVisionModel(cfg)
        >>> pyramid = ViTAdapterPyramid.from_vit(vit, inplanes=8)
        >>> out = pyramid(torch.rand(2, 3, 32, 32), vit)
        >>> tuple(out.last_hidden_state.shape), [tuple(m.shape[-2:]) for m in out.levels]
        ((2, 17, 32), [(16, 16), (8, 8), (4, 4), (2, 2)])
        >>> [f["reduction"] for f in pyramid.feature_info]
        [4, 8, 16, 32]
    """

    def __init__(self, dim: int, *, grid_size: tuple[int, int], depth: int, num_heads: int,
                 num_interactions: int = 4,
                 interaction_indexes: Sequence[tuple[int, int]] | None = None,
                 num_points: int = 4, ratio: float = 0.5, ffn_ratio: float = 0.25,
                 num_extra_extractors: int = 2, inplanes: int = 64, in_chans: int = 3,
                 pos_embed: bool = True, pos_table: str = "exact", spm_eps: float = 1e-5,
                 norm_layer: type[nn.Module] = nn.LayerNorm,
                 act_layer: type[nn.Module] = nn.GELU, backend: str | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if dim % 4 != 0 and pos_embed:
            raise ValueError(f"dim must be a multiple of 4 for the 2-D sincos embedding, got {dim}")
        groups = (split_depth(depth, num_interactions) if interaction_indexes is None
                  else [(int(a), int(b)) for a, b in interaction_indexes])
        if groups[0][0] != 0 or groups[-1][1] != depth or any(
                a >= b or b != a2 for (a, b), (a2, _) in zip(groups, groups[1:] + [(depth, 0)], strict=True)):
            raise ValueError(f"interaction_indexes must be contiguous half-open ranges covering "
                             f"layers 0..{depth - 1}, got {groups}")
        self.dim, self.depth, self.grid_size = dim, depth, (int(grid_size[0]), int(grid_size[1]))
        self.interaction_indexes = groups
        kw = {"device": device, "dtype": dtype}
        self.spm = SpatialPriorModule(dim, in_chans=in_chans, inplanes=inplanes, norm_eps=spm_eps,
                                      **kw)
        self.level_embed = nn.Parameter(torch.empty(3, dim, **kw))
        self.interactions = nn.ModuleList(
            InteractionBlock(dim, num_heads=num_heads, num_points=num_points, ratio=ratio,
                             ffn_ratio=ffn_ratio, norm_layer=norm_layer, act_layer=act_layer,
                             num_extra_extractors=num_extra_extractors if i == len(groups) - 1 else 0,
                             backend=backend, **kw)
            for i in range(len(groups))
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2, **kw)
        h, w = self.grid_size
        self.level_sizes = [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (math.ceil(h / 2), math.ceil(w / 2))]
        self.pos_embed = pos_embed
        if pos_embed:
            _level_pos_embeds(self, self.level_sizes, dim, self.grid_size, device, pos_table)
        self.grad_checkpointing = False
        self.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> ViTAdapterPyramid:
        """Recompute each interaction block (ViT group included) in the backward pass
        instead of storing its activations (training policy; off by default)."""
        self.grad_checkpointing = bool(enable)
        return self

    @classmethod
    def from_vit(cls, vit: nn.Module, **kwargs) -> ViTAdapterPyramid:
        """Build with ``dim``, ``grid_size``, ``depth``, ``num_heads`` and ``in_chans`` read
        from ``vit`` (a Hugging Face vision model or a ViTBackbone); ``kwargs`` override."""
        vb = as_vit_backbone(vit)
        p = next(vb.parameters())
        args = {"grid_size": vb.grid_size, "depth": vb.depth, "num_heads": vb.num_heads,
                "in_chans": vb.num_channels, "device": p.device, "dtype": p.dtype, **kwargs}
        return cls(vb.hidden_size, **args)

    @property
    def feature_info(self) -> list[dict]:
        """Per level: ``num_chs`` (d), ``reduction`` (stride, 16 px per ViT patch), ``size``."""
        return [{"num_chs": self.dim, "reduction": r, "size": s}
                for r, s in zip((4, 8, 16, 32), self.level_sizes, strict=True)]

    def reset_parameters(self) -> None:
        """trunc-normal(0.02) Linears, fan-out normal convs, then Deformable-DETR init of
        every deformable attention and ``gamma = 0`` in every injector."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        nn.init.normal_(self.level_embed, std=0.02)
        for block in self.interactions:
            block.injector.reset_parameters()
            block.injector.attn.reset_parameters()
            for ex in block.extractors:
                ex.attn.reset_parameters()

    def forward(self, pixel_values: torch.Tensor, vit: nn.Module) -> AdapterOutput:
        """Run ``vit`` with the adapter; see the class docstring for shapes."""
        vb = vit if isinstance(vit, ViTBackbone) else as_vit_backbone(vit)
        self._check_vit(vb)
        tokens = vb.embed(pixel_values)
        h, w = self.grid_size
        k = tokens.shape[1] - h * w  # prefix tokens (CLS, registers) as actually produced
        prefix, x = tokens[:, :k], tokens[:, k:]
        b = x.shape[0]
        image = F.interpolate(pixel_values.to(self.level_embed.dtype), size=(16 * h, 16 * w),
                              mode="bilinear", align_corners=False)
        c1, c2, c3, c4 = self.spm(image)
        shapes = [tuple(m.shape[-2:]) for m in (c2, c3, c4)]
        c = torch.cat([rearrange(m, "b d H W -> b (H W) d") + e
                       for m, e in zip((c2, c3, c4), self.level_embed, strict=True)], dim=1)
        x_ref = grid_reference_points([(h, w)], device=x.device).expand(b, -1, -1)
        c_ref = grid_reference_points(shapes, device=x.device).expand(b, -1, -1)
        maps = []
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block, (start, end) in zip(self.interactions, self.interaction_indexes, strict=True):
            call = partial(checkpoint, block, use_reentrant=False) if ckpt else block
            x, c, prefix = call(
                x, c.to(x.dtype), prefix,
                lambda t, s=start, e=end: vb.run_layers(t, s, e),
                x_ref=x_ref, c_ref=c_ref, vit_shape=(h, w), shapes=shapes,
            )
            maps.append(rearrange(x, "b (H W) d -> b d H W", H=h))
        hidden = vb.final_norm(torch.cat([prefix, x], dim=1))
        c2, c3, c4 = (rearrange(part, "b (H W) d -> b d H W", H=hh)
                      for part, (hh, _) in zip(c.split([a * bb for a, bb in shapes], dim=1),
                                               shapes, strict=True))
        adapter = [c1 + self.up(c2), c2, c3, c4]
        levels = []
        g = len(maps)
        for i, cm in enumerate(adapter):
            xm = maps[-((-(i + 1) * g) // 4) - 1]  # the block ending the (i+1)-th quarter
            level = cm + resize_map(xm, tuple(cm.shape[-2:])).to(cm.dtype)
            if self.pos_embed:
                level = level + _level_table(self, i, tuple(level.shape[-2:])).to(level.dtype)
            levels.append(level)
        return AdapterOutput(hidden, levels)

    def _check_vit(self, vb: ViTBackbone) -> None:
        got = (vb.hidden_size, vb.depth, vb.grid_size)
        want = (self.dim, self.depth, self.grid_size)
        if got != want:
            raise ValueError(
                f"this ViTAdapterPyramid was built for a ViT with (hidden_size, depth, grid) = "
                f"{want}, but the ViT passed has {got}; build it with ViTAdapterPyramid.from_vit(vit)"
            )


class SimpleFeaturePyramid(nn.Module):
    """ViTDet pyramid: deconvolutions / pooling of the last ViT map, one branch per scale.

    Scale 4: ConvT(2×2, s2) → norm → act → ConvT(2×2, s2); scale 2: ConvT; scale 1:
    identity; scale 0.5: max-pool 2×2. Every branch then ends in Conv1×1 → norm →
    Conv3×3 → norm to ``out_dim`` channels, plus (optionally) the fixed 2-D sincos table
    in ViT-grid coordinates.

    Args:
        dim: input width d.
        grid_size: ViT patch grid (H, W) the input map has.
        out_dim: output channels (default ``dim``).
        scales: per-level scale factors, each one of 4, 2, 1, 0.5.
        pos_embed: add the fixed 2-D sincos table to every level.
        pos_table: ``"exact"`` or ``"official"`` (as [`ViTAdapterPyramid`][mmlayers.layers.pyramid.ViTAdapterPyramid]).
        norm_layer: 2-D norm class (channel LayerNorm).
        act_layer: activation class.
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Shapes:
        x (b, d, H, W) → levels [(b, out_dim, H·s, W·s) for s in scales].

    Examples:
        >>> import torch
        >>> from mmlayers.layers.pyramid import SimpleFeaturePyramid
        >>> fpn = SimpleFeaturePyramid(32, grid_size=(4, 4))
        >>> [tuple(m.shape) for m in fpn(torch.randn(2, 32, 4, 4))]
        [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    """

    _SCALES = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, dim: int, *, grid_size: tuple[int, int], out_dim: int | None = None,
                 scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5), pos_embed: bool = True,
                 pos_table: str = "exact", norm_layer: type[nn.Module] = LayerNorm2d, act_layer: type[nn.Module] = nn.GELU,
                 device=None, dtype=None) -> None:
        super().__init__()
        bad = [s for s in scales if float(s) not in self._SCALES]
        if bad or not scales:
            raise ValueError(f"scales must be a non-empty subset of {self._SCALES}, got {tuple(scales)}")
        out_dim = out_dim or dim
        if pos_embed and out_dim % 4 != 0:
            raise ValueError(f"out_dim must be a multiple of 4 for the 2-D sincos embedding, got {out_dim}")
        kw = {"device": device, "dtype": dtype}
        self.dim, self.out_dim, self.scales = dim, out_dim, tuple(float(s) for s in scales)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.branches = nn.ModuleList()
        for s in self.scales:
            if s == 4.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, 2, **kw), norm_layer(dim // 2, **kw),
                          act_layer(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2, **kw)]
                width = dim // 4
            elif s == 2.0:
                layers, width = [nn.ConvTranspose2d(dim, dim // 2, 2, 2, **kw)], dim // 2
            elif s == 1.0:
                layers, width = [], dim
            else:
                layers, width = [nn.MaxPool2d(2, 2)], dim
            layers += [nn.Conv2d(width, out_dim, 1, bias=False, **kw), norm_layer(out_dim, **kw),
                       nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False, **kw),
                       norm_layer(out_dim, **kw)]
            self.branches.append(nn.Sequential(*layers))
        h, w = self.grid_size
        self.level_sizes = [(int(h * s), int(w * s)) for s in self.scales]
        self.pos_embed = pos_embed
        if pos_embed:
            _level_pos_embeds(self, self.level_sizes, out_dim, self.grid_size, device, pos_table)

    @property
    def feature_info(self) -> list[dict]:
        """Per level: ``num_chs``, ``reduction`` (16 px per ViT patch, as ViT-Adapter), ``size``."""
        return [{"num_chs": self.out_dim, "reduction": int(16 / s), "size": size}
                for s, size in zip(self.scales, self.level_sizes, strict=True)]

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(b, d, H, W) → one (b, out_dim, H_l, W_l) map per scale."""
        if x.dim() != 4 or x.shape[1] != self.dim or tuple(x.shape[-2:]) != self.grid_size:
            raise ValueError(f"x must have shape (b, {self.dim}, {self.grid_size[0]}, "
                             f"{self.grid_size[1]}), got {tuple(x.shape)}")
        levels = [branch(x) for branch in self.branches]
        if self.pos_embed:
            levels = [m + _level_table(self, i, tuple(m.shape[-2:])).to(m.dtype)
                      for i, m in enumerate(levels)]
        return levels
