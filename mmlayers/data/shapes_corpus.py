"""The shapes corpus as a dataset: deterministic interleaved documents of rendered shapes.

Shape key: c channels · H height · W width (images are square, H = W = ``size``).

The images, their attributes and the pixel rules that read them back are in
[`mmlayers.data.shapes`][mmlayers.data.shapes]; this module draws documents from them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mmlayers.data.document import Document, image_to_tensor
from mmlayers.data.shapes import (
    _WHERE,
    COLORS,
    KINDS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeAttributes,
    _check_size,
    _geometry,
    describe_image,
    render_shapes,
)

__all__ = ["ShapesCorpus"]


class ShapesCorpus(torch.utils.data.Dataset):
    """An indexable, iterable dataset of interleaved shapes documents.

    Document ``i`` depends only on ``(seed, i)``. ``doc.meta`` holds ``kind``, ``index``,
    ``images`` (per image, the tuple of [`ShapeAttributes`][mmlayers.data.shapes.ShapeAttributes] drawn) and ``texts``.

    Args:
        seed: corpus seed.
        size: image side in pixels (32–64 recommended; 24–256 accepted).
        length: number of documents.
        kinds: document kinds to draw from uniformly (repeat a kind to weight it).
        colors: palette colour names used.
        shapes: shapes used.
        max_shapes: at most this many shapes per caption/captioning image (1–3).
        max_images: most images in a ``sequence`` document (2 or more).
        jitter: randomise the box inside its slot (and vertically) instead of centring it.
        caption_first: mark ``caption_image`` documents as caption-first pairs.
        tensors: images as float (3, H, W) tensors in [0, 1] instead of PIL images.

    Examples:
        >>> corpus = ShapesCorpus(seed=0, length=8, kinds=("caption_image",))
        >>> doc = corpus[3]
        >>> isinstance(doc.items[0], str), doc.num_images, doc.caption_first
        (True, 1, True)
        >>> all(describe_image(img) == list(attrs)
        ...     for d in corpus for img, attrs in zip(d.images, d.meta["images"]))
        True
    """

    def __init__(self, *, seed: int = 0, size: int = 32, length: int = 1000,
                 kinds: Sequence[str] = KINDS, colors: Sequence[str] = ("red", "green", "blue", "yellow"),
                 shapes: Sequence[str] = SHAPES, max_shapes: int = 2, max_images: int = 4,
                 jitter: bool = True, caption_first: bool = True, tensors: bool = False) -> None:
        _check_size(size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        for name, got, allowed in (("kinds", kinds, KINDS), ("colors", colors, COLORS),
                                   ("shapes", shapes, SHAPES)):
            if isinstance(got, str) or not got or any(g not in allowed for g in got):
                raise ValueError(f"{name} must be a non-empty sequence of {list(allowed)}, "
                                 f"got {got!r}")
        if not 1 <= max_shapes <= min(3, len(colors)):
            raise ValueError(f"max_shapes must be in [1, {min(3, len(colors))}] (3 slots, one "
                             f"colour per shape), got {max_shapes!r}")
        if max_images < 2:
            raise ValueError(f"max_images must be at least 2, got {max_images!r}")
        if "edit" in kinds or "sequence" in kinds:
            if len(colors) < 2 or len(shapes) < 2:
                raise ValueError("edit and sequence documents need at least 2 colors and 2 shapes")
        self.seed, self.size, self.length = seed, size, length
        self.kinds, self.colors, self.shapes = tuple(kinds), tuple(colors), tuple(shapes)
        self.max_shapes, self.max_images = max_shapes, max_images
        self.jitter, self.caption_first, self.tensors = jitter, caption_first, tensors

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Document]:
        return (self[i] for i in range(self.length))

    def __getitem__(self, index: int) -> Document:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a corpus of {self.length}")
        index %= self.length
        rng = random.Random(f"shapes:{self.seed}:{index}")
        kind = rng.choice(self.kinds)
        first = self._scene(rng, 1 if kind in ("edit", "sequence") else None)
        scenes, texts = [first], [self._caption(first)]
        if kind in ("caption_image", "image_caption"):
            order = ["t", 0] if kind == "caption_image" else [0, "t"]
        else:
            n = 2 if kind == "edit" else rng.randint(2, self.max_images)
            order = ["t", 0] if kind == "edit" or rng.random() < 0.5 else [0, "t"]
            for k in range(1, n):
                scene, text = self._edit(rng, scenes[-1])
                scenes.append(scene)
                texts.append(text)
                order += [f"t{k}", k]
        images = [self._render(s) for s in scenes]
        items = [images[o] if isinstance(o, int) else texts[int(o[1:] or 0)] for o in order]
        meta = {"kind": kind, "index": index, "texts": texts,
                "images": [tuple(a for a, _, _ in s) for s in scenes]}
        return Document(items, caption_first=self.caption_first and kind == "caption_image",
                        meta=meta)

    def vocabulary(self) -> list[str]:
        """Every word and punctuation mark the corpus can write (lower case, sorted)."""
        texts = ["a and now the same in of but colour , .", *_WHERE.values(),
                 *COLORS, *SHAPES, *SIZES]
        return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})

    def describe(self, image: Any) -> list[ShapeAttributes]:
        """[`describe_image`][mmlayers.data.shapes.describe_image] with this corpus's palette."""
        return describe_image(image, colors=self.colors)

    # -- drawing ---------------------------------------------------------------------------
    def _place(self, rng: random.Random, attrs: ShapeAttributes) -> tuple[ShapeAttributes, int, int]:
        slots, small, large = _geometry(self.size)
        lo, hi = slots[POSITIONS.index(attrs.position)]
        d = large if attrs.size == "large" else small
        y_mid, spread = (self.size - d) // 2, self.size // 8
        if not self.jitter:
            return attrs, lo + (hi - lo - d) // 2, y_mid
        return attrs, rng.randint(lo, hi - d), rng.randint(y_mid - spread, y_mid + spread)

    def _scene(self, rng: random.Random, n: int | None) -> list[tuple[ShapeAttributes, int, int]]:
        n = rng.randint(1, self.max_shapes) if n is None else n
        positions = sorted(rng.sample(range(3), n))
        colors = rng.sample(self.colors, n)
        return [self._place(rng, ShapeAttributes(c, rng.choice(self.shapes), POSITIONS[p],
                                                 rng.choice(SIZES)))
                for p, c in zip(positions, colors, strict=True)]

    def _edit(self, rng: random.Random, scene: list) -> tuple[list, str]:
        (a, x0, y0), = scene
        what = rng.choice(("color", "position", "size", "shape"))
        if what == "color":
            new = ShapeAttributes(rng.choice([c for c in self.colors if c != a.color]),
                                  a.shape, a.position, a.size)
            return [(new, x0, y0)], f"now the same {a.shape} in {new.color}."
        if what == "shape":
            new = ShapeAttributes(a.color, rng.choice([s for s in self.shapes if s != a.shape]),
                                  a.position, a.size)
            return [(new, x0, y0)], f"now a {new.shape} of the same colour."
        if what == "position":
            where = rng.choice([p for p in POSITIONS if p != a.position])
            new = ShapeAttributes(a.color, a.shape, where, a.size)
            return [self._place(rng, new)], f"now the same {a.shape} {_WHERE[where]}."
        new = ShapeAttributes(a.color, a.shape, a.position, "small" if a.size == "large" else "large")
        return [self._place(rng, new)], f"now the same {a.shape}, but {new.size}."

    def _caption(self, scene: list) -> str:
        return " and ".join(a.phrase() for a, _, _ in scene) + "."

    def _render(self, scene: list):
        image = render_shapes(scene, size=self.size)
        return image_to_tensor(image) if self.tensors else image
