"""ViT-Adapter building blocks: spatial prior module and interaction blocks.

Shape key: b batch · n ViT patch tokens (H·W) · s pyramid tokens (Σ_l H_l·W_l) ·
l levels · d width · c,H,W image.

Chen et al., "Vision Transformer Adapter for Dense Predictions" (ICLR 2023). A
convolutional *spatial prior module* turns the image into maps at strides 8, 16, 32
(plus a stride-4 map used only at the end). Each *interaction block* wraps one group of
ViT layers: an injector lets the ViT tokens read the pyramid (deformable attention,
scaled by a zero-initialised per-channel ``gamma``, so the ViT is unchanged at init),
the ViT group runs, and extractors let the pyramid read the ViT tokens back (deformable
attention + a convolutional FFN). The full model is
[`mmlayers.layers.pyramid.ViTAdapterPyramid`][mmlayers.layers.pyramid.ViTAdapterPyramid].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmlayers.layers.deformable_attention import MultiScaleDeformableAttention

__all__ = [
    "ConvFFN",
    "Extractor",
    "Injector",
    "InteractionBlock",
    "LayerNorm2d",
    "SpatialPriorModule",
    "grid_reference_points",
]

Shapes = Sequence[tuple[int, int]]


def grid_reference_points(shapes: Shapes, *, device=None) -> torch.Tensor:
    """Cell centres ``((j + 0.5)/W_l, (i + 0.5)/H_l)`` of every level, rows first: (s, 2)."""
    refs = []
    for h, w in shapes:
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        refs.append(torch.stack([xx.flatten(), yy.flatten()], -1))
    return torch.cat(refs, 0)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (b, c, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "b c H W -> b H W c")
        return rearrange(super().forward(x), "b H W c -> b c H W")


class SpatialPriorModule(nn.Module):
    """ResNet-like stem giving maps at strides 4, 8, 16 and 32, all projected to ``dim``.

    Args:
        dim: output width d.
        in_chans: image channels c.
        inplanes: stem width (ViT-Adapter uses 64); later stages use 2× and 4×.
        norm_layer: 2-D norm class (default channel LayerNorm).
        act_layer: activation class.
        norm_eps: epsilon of every ``norm_layer`` (1e-5; the official ViT-Adapter uses 1e-6).
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Shapes:
        image (b, c, H, W) → four maps (b, d, ⌈H/4⌉, ⌈W/4⌉) … (b, d, ⌈H/32⌉, ⌈W/32⌉).

    Examples:
        >>> import torch
        >>> from mmlayers.layers.vit_adapter import SpatialPriorModule
        >>> spm = SpatialPriorModule(32, inplanes=8)
        >>> [tuple(m.shape) for m in spm(torch.rand(1, 3, 64, 64))]
        [(1, 32, 16, 16), (1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]
        >>> SpatialPriorModule(32, inplanes=8, norm_eps=1e-6).stem[1].eps
        1e-06
    """

    def __init__(self, dim: int, *, in_chans: int = 3, inplanes: int = 64,
                 norm_layer: type[nn.Module] = LayerNorm2d, act_layer: type[nn.Module] = nn.ReLU,
                 norm_eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"norm_eps must be a positive number, got {norm_eps!r}")
        kw = {"device": device, "dtype": dtype}

        def conv(i: int, o: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, stride, 1, bias=False, **kw),
                    norm_layer(o, eps=norm_eps, **kw), act_layer()]

        p = inplanes
        self.stem = nn.Sequential(*conv(in_chans, p, 2), *conv(p, p, 1), *conv(p, p, 1),
                                  nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*conv(p, 2 * p, 2))
        self.conv3 = nn.Sequential(*conv(2 * p, 4 * p, 2))
        self.conv4 = nn.Sequential(*conv(4 * p, 4 * p, 2))
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, 1, **kw) for c in (p, 2 * p, 4 * p, 4 * p))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        # channels-last makes the channel LayerNorms free views and the convs faster on CPU
        c1 = self.stem(image.contiguous(memory_format=torch.channels_last))
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [proj(c) for proj, c in zip(self.proj, (c1, c2, c3, c4), strict=True)]


class ConvFFN(nn.Module):
    """Linear → depthwise 3×3 conv on each level's map → act → Linear.

    Shapes: x (b, s, d) with s = Σ_l H_l·W_l, shapes [(H_l, W_l)] → (b, s, d).
    """

    def __init__(self, dim: int, *, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU,
                 device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **kw)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim, **kw)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim, **kw)

    def forward(self, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        x = self.fc1(x)
        parts = x.split([h * w for h, w in shapes], dim=1)
        x = torch.cat([
            rearrange(self.dwconv(rearrange(part, "b (H W) d -> b d H W", H=h, W=w)),
                      "b d H W -> b (H W) d")
            for part, (h, w) in zip(parts, shapes, strict=True)
        ], dim=1)
        return self.fc2(self.act(x))


class Injector(nn.Module):
    """ViT tokens read the pyramid: ``x + gamma · MSDA(norm(x), norm(c))``, ``gamma = 0`` at init.

    Shapes: x (b, n, d), ref (b, n, 2), c (b, s, d), shapes of the l pyramid levels → (b, n, d).
    """

    def __init__(self, dim: int, *, num_heads: int, num_levels: int = 3, num_points: int = 4,
                 ratio: float = 0.5, norm_layer: type[nn.Module] = nn.LayerNorm,
                 backend: str | None = None, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.query_norm = norm_layer(dim, **kw)
        self.feat_norm = norm_layer(dim, **kw)
        self.attn = MultiScaleDeformableAttention(dim, num_heads=num_heads, num_levels=num_levels,
                                                  num_points=num_points, ratio=ratio,
                                                  backend=backend, **kw)
        self.gamma = nn.Parameter(torch.empty(dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gamma)

    def forward(self, x: torch.Tensor, ref: torch.Tensor, c: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), shapes)


class Extractor(nn.Module):
    """The pyramid reads the ViT tokens: ``c + MSDA(norm(c), norm(x))``, then ``+ ConvFFN``.

    Shapes: c (b, s, d), ref (b, s, 2), x (b, n, d), vit_shape (H, W), pyramid shapes → (b, s, d).
    """

    def __init__(self, dim: int, *, num_heads: int, num_points: int = 4, ratio: float = 0.5,
                 ffn_ratio: float = 0.25, norm_layer: type[nn.Module] = nn.LayerNorm,
                 act_layer: type[nn.Module] = nn.GELU, backend: str | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.query_norm = norm_layer(dim, **kw)
        self.feat_norm = norm_layer(dim, **kw)
        self.attn = MultiScaleDeformableAttention(dim, num_heads=num_heads, num_levels=1,
                                                  num_points=num_points, ratio=ratio,
                                                  backend=backend, **kw)
        self.ffn = None
        if ffn_ratio > 0:
            self.ffn_norm = norm_layer(dim, **kw)
            self.ffn = ConvFFN(dim, hidden_dim=int(dim * ffn_ratio), act_layer=act_layer, **kw)

    def forward(self, c: torch.Tensor, ref: torch.Tensor, x: torch.Tensor,
                vit_shape: tuple[int, int], shapes: Shapes) -> torch.Tensor:
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), [vit_shape])
        if self.ffn is not None:
            c = c + self.ffn(self.ffn_norm(c), shapes)
        return c


class InteractionBlock(nn.Module):
    """Injector → a group of ViT layers → extractor(s).

    The ViT layers are not owned: ``forward`` receives them as ``run_layers``, a callable
    (b, t, d) → (b, t, d) on the full token sequence (prefix tokens such as CLS included).

    Args:
        dim: width d (the ViT's hidden size).
        num_heads: deformable-attention heads.
        num_points: sampling points per head and level.
        ratio: deformable-attention width as a fraction of ``dim``.
        ffn_ratio: ConvFFN hidden width as a fraction of ``dim`` (0 disables it).
        num_extra_extractors: extractors after the first (ViT-Adapter: 2 in the last block).
        norm_layer: normalisation class.
        act_layer: activation class of the feed-forward network.
        backend: deformable-attention op backend.
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Shapes:
        x (b, n, d) patch tokens, c (b, s, d) pyramid tokens, prefix (b, k, d),
        x_ref (b, n, 2), c_ref (b, s, 2), vit_shape (H, W), shapes [(H_l, W_l)] × 3
        → x (b, n, d), c (b, s, d), prefix (b, k, d).
    """

    def __init__(self, dim: int, *, num_heads: int, num_points: int = 4, ratio: float = 0.5,
                 ffn_ratio: float = 0.25, num_extra_extractors: int = 0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, act_layer: type[nn.Module] = nn.GELU,
                 backend: str | None = None, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"num_heads": num_heads, "num_points": num_points, "ratio": ratio,
              "norm_layer": norm_layer, "backend": backend, "device": device, "dtype": dtype}
        self.injector = Injector(dim, num_levels=3, **kw)
        self.extractors = nn.ModuleList(
            Extractor(dim, ffn_ratio=ffn_ratio, act_layer=act_layer, **kw)
            for _ in range(1 + num_extra_extractors)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor, prefix: torch.Tensor,
                run_layers: Callable[[torch.Tensor], torch.Tensor], *, x_ref: torch.Tensor,
                c_ref: torch.Tensor, vit_shape: tuple[int, int], shapes: Shapes
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = prefix.shape[1]
        x = self.injector(x, x_ref, c, shapes)
        tokens = run_layers(torch.cat([prefix, x], dim=1))
        prefix, x = tokens[:, :k], tokens[:, k:]
        for extractor in self.extractors:
            c = extractor(c, c_ref, x, vit_shape, shapes)
        return x, c, prefix


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (b, d, H, W) map (no-op when the size already matches)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
