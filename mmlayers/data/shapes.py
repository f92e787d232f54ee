"""The shapes corpus: procedurally rendered interleaved documents, and pixel rules to score.

Shape key: c channels · H height · W width (images are square, H = W = ``size``).

Every image shows one or more filled shapes (circle, square, triangle) on a white
background, each in a palette colour, in one of three horizontal slots (left, centre,
right) and one of two sizes (small, large). Geometry is snapped to whole pixels and drawn
4× supersampled, so clean renders are exactly readable back:

- colour: each pixel is modelled as a blend ``white + α·(colour − white)``; it belongs to the
  palette colour whose blend line it is nearest to (residual ≤ ``max_residual``) with
  coverage α ≥ 0.5, otherwise to the background;
- shapes are 4-connected same-colour components of at least ``min_area`` pixels;
- shape: fill = area / bounding-box area (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2) and,
  for pointed-up triangles, the extra pixels in the lower half of the box;
- position: the centroid's third of the width; size: the box side against the midpoint
  of the small and large sides.

Documents ([`ShapesCorpus`][mmlayers.data.shapes_corpus.ShapesCorpus], all deterministic
in ``(seed, index)``, no global RNG):
``caption_image`` (text-to-image pair, ``caption_first``), ``image_caption`` (captioning),
``edit`` ("now the same circle in blue." → image) and ``sequence`` (2–``max_images`` images
chained by edits).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmlayers._optional import require
from mmlayers.data.document import image_to_tensor

__all__ = ["COLORS", "KINDS", "POSITIONS", "SHAPES", "SIZES", "ImageScore", "ShapeAttributes",
           "caption_matches", "describe_image", "parse_caption", "render_shapes", "score_image"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (235, 200, 20), "purple": (140, 40, 190), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "centre", "right")
SIZES = ("small", "large")
KINDS = ("caption_image", "image_caption", "edit", "sequence")
_WHERE = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeAttributes:
    """What one shape in an image is: colour, shape, position and size (``None``: unknown)."""

    color: str
    shape: str
    position: str | None = None
    size: str | None = None

    def phrase(self) -> str:
        """``"a small red circle on the left"`` (parts that are ``None`` are left out)."""
        words = ["a", self.size, self.color, self.shape, _WHERE.get(self.position)]
        return " ".join(w for w in words if w)


def _geometry(size: int) -> tuple[list[tuple[int, int]], int, int]:
    """Integer slot ranges [lo, hi) for the three positions, small and large sides."""
    slots = [(math.ceil(i * size / 3), (i + 1) * size // 3) for i in range(3)]
    width = min(hi - lo for lo, hi in slots)
    return slots, round(0.19 * size), min(width, round(0.31 * size))


def _check_size(size: Any) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 24 <= size <= 256:
        raise ValueError(f"size must be an int in [24, 256] pixels, got {size!r}")


def render_shapes(placed: Sequence[tuple[ShapeAttributes, int, int]], *, size: int = 32):
    """Draw shapes on a white ``size``×``size`` RGB PIL image.

    Args:
        placed: ``(attributes, x0, y0)`` per shape: top-left pixel of the shape's box; the box
            side is the small or large side for ``size`` (see the module docstring).
        size: image side in pixels.

    Examples:
        >>> img = render_shapes([(ShapeAttributes("red", "square", "left", "large"), 0, 11)])
        >>> img.size, img.getpixel((5, 16)), img.getpixel((20, 16))
        ((32, 32), (220, 30, 30), (255, 255, 255))
    """
    require("PIL", "data")
    from PIL import Image, ImageDraw

    _check_size(size)
    _, small, large = _geometry(size)
    k = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for attrs, x0, y0 in placed:
        if attrs.color not in COLORS or attrs.shape not in SHAPES or attrs.size not in SIZES:
            raise ValueError(f"cannot render {attrs}: colour must be one of {list(COLORS)}, "
                             f"shape one of {SHAPES}, size one of {SIZES}")
        d = large if attrs.size == "large" else small
        box = (x0 * k, y0 * k, (x0 + d) * k - 1, (y0 + d) * k - 1)
        fill = COLORS[attrs.color]
        if attrs.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif attrs.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([((box[0] + box[2] + 1) / 2, box[1]), (box[2], box[3]),
                          (box[0], box[3])], fill=fill)
    return canvas.resize((size, size), Image.BOX)


def _labels(image: Any, colors: Sequence[str], max_residual: float) -> torch.Tensor:
    """(H, W) long: index into ``colors`` per pixel, −1 for background."""
    x = image_to_tensor(image)
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an RGB image (3, H, W), got shape {tuple(x.shape)}")
    q = (1.0 - x.permute(1, 2, 0).reshape(-1, 3)) * 255.0  # distance from white
    d = 255.0 - torch.tensor([COLORS[c] for c in colors], dtype=torch.float32)  # (K, 3)
    dot = q @ d.T
    alpha = dot / (d * d).sum(1)
    residual = ((q * q).sum(1, keepdim=True) - dot * alpha).clamp(min=0).sqrt()
    residual = residual.masked_fill(alpha < 0.5, float("inf"))
    best, label = residual.min(1)
    return torch.where(best <= max_residual, label, -1).view(x.shape[1], x.shape[2])


def _components(label: list[list[int]]) -> list[tuple[int, list[tuple[int, int]]]]:
    """4-connected components of equal non-negative labels: (label, [(y, x), …])."""
    h, w = len(label), len(label[0])
    seen = [[False] * w for _ in range(h)]
    out = []
    for y in range(h):
        for x in range(w):
            if seen[y][x] or label[y][x] < 0:
                continue
            k, stack, pixels = label[y][x], [(y, x)], []
            seen[y][x] = True
            while stack:
                cy, cx = stack.pop()
                pixels.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny][nx] and label[ny][nx] == k:
                        seen[ny][nx] = True
                        stack.append((ny, nx))
            out.append((k, pixels))
    return out


def describe_image(image: Any, *, colors: Sequence[str] = tuple(COLORS), min_area: int | None = None,
                   max_residual: float = 80.0) -> list[ShapeAttributes]:
    """Read colour, shape, position and size of every shape back from pixels.

    Args:
        image: RGB PIL image or float (3, H, W) tensor in [0, 1] (e.g. a generated image).
        colors: palette names to look for.
        min_area: smallest component kept, in pixels; default a quarter of the small side².
        max_residual: largest distance (0–255 RGB units) from a colour's blend line.

    Returns:
        The shapes found, ordered by centroid from left to right.

    Examples:
        >>> attrs = ShapeAttributes("blue", "triangle", "right", "small")
        >>> describe_image(render_shapes([(attrs, 24, 13)])) == [attrs]
        True
    """
    unknown = [c for c in colors if c not in COLORS]
    if unknown or not colors:
        raise ValueError(f"colors must be names from {list(COLORS)}, got {list(colors)}")
    label = _labels(image, colors, max_residual)
    h, w = label.shape
    _, small, large = _geometry(w)
    min_area = max(1, small * small // 4) if min_area is None else min_area
    found = []
    for k, pixels in _components(label.tolist()):
        if len(pixels) < min_area:
            continue
        ys, xs = [p[0] for p in pixels], [p[1] for p in pixels]
        bw, bh = max(xs) - min(xs) + 1, max(ys) - min(ys) + 1
        fill = len(pixels) / (bw * bh)
        mid = (min(ys) + max(ys) + 1) / 2
        lower = sum(1 for y in ys if y + 0.5 > mid) - sum(1 for y in ys if y + 0.5 < mid)
        if fill >= 0.93:
            shape = "square"
        elif fill < 0.68 or lower / len(pixels) >= 0.2:
            shape = "triangle"
        else:
            shape = "circle"
        cx = (sum(xs) / len(xs) + 0.5) / w
        position = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
        side = "large" if max(bw, bh) >= (small + large) / 2 else "small"
        found.append((cx, ShapeAttributes(colors[k], shape, position, side)))
    return [a for _, a in sorted(found, key=lambda t: t[0])]


@dataclass(frozen=True)
class ImageScore:
    """Fractions of the expected shapes whose colour / shape / size were read back at their
    position (``position``: a shape was found there); ``exact``: the (colour, shape, position)
    multiset read back equals the expected one."""

    color: float
    shape: float
    position: float
    size: float
    exact: bool


def score_image(image: Any, expected: Sequence[ShapeAttributes], **kwargs: Any) -> ImageScore:
    """Score a (generated) image against the shapes it should show.

    ``kwargs`` go to [`describe_image`][mmlayers.data.shapes.describe_image].

    Examples:
        >>> want = [ShapeAttributes("red", "circle", "left", "large")]
        >>> img = render_shapes([(ShapeAttributes("blue", "circle", "left", "large"), 0, 11)])
        >>> s = score_image(img, want)
        >>> s.color, s.shape, s.position, s.exact
        (0.0, 1.0, 1.0, False)
    """
    if not expected:
        raise ValueError("expected must list at least one ShapeAttributes")
    found = describe_image(image, **kwargs)
    hits = {"color": 0, "shape": 0, "position": 0, "size": 0}
    for e in expected:
        there = [f for f in found if f.position == e.position]
        if there:
            f = there[0]
            hits["position"] += 1
            hits["color"] += f.color == e.color
            hits["shape"] += f.shape == e.shape
            hits["size"] += f.size == e.size
    key = sorted((a.color, a.shape, a.position) for a in found)
    exact = key == sorted((a.color, a.shape, a.position) for a in expected)
    return ImageScore(**{k: v / len(expected) for k, v in hits.items()}, exact=exact)


def parse_caption(text: str) -> list[ShapeAttributes]:
    """Shapes named in a caption (`"a [small|large] <colour> <shape> [on the left|…]"`).

    Examples:
        >>> for shape in parse_caption("A red circle on the left and a small blue square."):
        ...     print(shape)
        ShapeAttributes(color='red', shape='circle', position='left', size=None)
        ShapeAttributes(color='blue', shape='square', position=None, size='small')
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    where = "|".join(_WHERE.values())
    pattern = (rf"\b(?:({'|'.join(SIZES)})\s+)?({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})"
               rf"(?:\s+({where}))?")
    inverse = {v: k for k, v in _WHERE.items()}
    return [ShapeAttributes(c, s, inverse.get(" ".join(p.split())) if p else None, z or None)
            for z, c, s, p in re.findall(pattern, text.lower())]


def caption_matches(text: str, expected: Sequence[ShapeAttributes], *,
                    position: bool = False, size: bool = False) -> bool:
    """Exact match of the (colour, shape) multiset named in ``text``, and of each shape's
    position and size when asked (a caption that leaves one out then does not match).

    Args:
        text: a caption, e.g. ``"a small red circle on the left."``.
        expected: the shapes the image shows.
        position: also compare every shape's position.
        size: also compare every shape's size.

    Returns:
        True when the multisets are equal.

    Examples:
        >>> want = [ShapeAttributes("red", "circle", "left", "small")]
        >>> caption_matches("a red circle on the right.", want)
        True
        >>> caption_matches("a red circle on the right.", want, position=True)
        False
        >>> caption_matches("a large red circle on the left.", want, position=True, size=True)
        False
        >>> caption_matches("a small red circle on the left.", want, position=True, size=True)
        True
    """
    def key(a):
        return (a.color, a.shape) + ((a.position,) if position else ()) + \
            ((a.size,) if size else ())

    return sorted(map(key, parse_caption(text))) == sorted(map(key, expected))


def __getattr__(name: str):
    # ShapesCorpus lives in mmlayers.data.shapes_corpus (it builds on this module)
    if name == "ShapesCorpus":
        from mmlayers.data.shapes_corpus import ShapesCorpus

        return ShapesCorpus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
