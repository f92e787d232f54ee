"""The interleaved document: an ordered list of text and image items.

Shape key: c channels · H height · W width.

A document is what one web page, one caption pair or one generated story becomes before
tokenisation: ``["a red circle on the left.", <image>, "now the same circle in blue.",
<image>]``. Text items are ``str``; image items are PIL images or float tensors (c, H, W)
with values in [0, 1]. Per-dataset options travel with each document:

- ``caption_first``: a pair dataset whose text precedes the image (text-to-image pairs).
  Text with no earlier image in its document gets no text loss (as in the official code); the
  ``<soi>`` after the caption and everything after the first image are trained.
- ``prompt_items``: how many leading items are a prompt (instruction, question); their
  tokens get no text loss.
- ``meta``: free-form metadata (attributes kept for scoring, the source, …); the
  collator never reads it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Document", "image_to_tensor", "is_image"]


def _pil_image_class():
    """PIL's ``Image`` class if PIL is already imported (then an item can be one), else None."""
    module = sys.modules.get("PIL.Image")
    return None if module is None else module.Image


def is_image(item: Any) -> bool:
    """Whether ``item`` is an image item (a PIL image or a tensor), not text.

    Examples:
        >>> import torch
        >>> is_image(torch.zeros(3, 8, 8)), is_image("a red circle.")
        (True, False)
    """
    pil = _pil_image_class()
    return isinstance(item, torch.Tensor) or (pil is not None and isinstance(item, pil))


def image_to_tensor(image: Any) -> torch.Tensor:
    """A PIL image or a (c, H, W) tensor → float32 (c, H, W) in [0, 1] (no numpy needed).

    PIL images are converted to RGB (8-bit greyscale stays one channel); tensors are cast to
    float32 and returned as they are otherwise.

    Examples:
        >>> from PIL import Image
        >>> t = image_to_tensor(Image.new("RGB", (4, 2), (255, 0, 51)))
        >>> tuple(t.shape), [round(v, 2) for v in t[:, 0, 0].tolist()]
        ((3, 2, 4), [1.0, 0.0, 0.2])
    """
    if isinstance(image, torch.Tensor):
        return image.float()
    pil = _pil_image_class()
    if pil is None or not isinstance(image, pil):
        raise TypeError(f"expected a PIL image or a (c, H, W) tensor, got {type(image).__name__}")
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    c = 3 if image.mode == "RGB" else 1
    w, h = image.size
    raw = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return raw.view(h, w, c).permute(2, 0, 1).float().div_(255.0)


def _check_image(item: Any, index: int) -> None:
    if not isinstance(item, torch.Tensor):
        return  # a PIL image: always valid
    if item.dim() != 3 or not item.dtype.is_floating_point:
        raise ValueError(f"item {index}: an image tensor must be float (c, H, W), got "
                         f"{item.dtype} of shape {tuple(item.shape)}")
    if item.numel() and (item.min() < 0 or item.max() > 1):
        raise ValueError(f"item {index}: image values must lie in [0, 1], got "
                         f"[{float(item.min()):.3g}, {float(item.max()):.3g}]")


@dataclass
class Document:
    """An interleaved image-text document.

    Args:
        items: text (``str``) and image (PIL image or float (c, H, W) tensor in [0, 1])
            items in reading order.
        caption_first: text before the document's first image gets no text loss (pair
            datasets where the caption precedes the image).
        prompt_items: number of leading items that form a prompt (no text loss on them).
        meta: free-form metadata, e.g. rendered attributes for scoring.

    Raises:
        TypeError: an item that is neither text nor an image; non-bool ``caption_first``.
        ValueError: a malformed image tensor or ``prompt_items`` out of range.

    Examples:
        >>> import torch
        >>> doc = Document(["a red circle.", torch.zeros(3, 8, 8)], caption_first=True)
        >>> doc.num_images, doc.texts
        (1, ['a red circle.'])
    """

    items: list[Any]
    caption_first: bool = False
    prompt_items: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.items, (str, bytes)) or not isinstance(self.items, (list, tuple)):
            raise TypeError(f"items must be a list of text and image items, got "
                            f"{type(self.items).__name__}")
        self.items = list(self.items)
        for i, item in enumerate(self.items):
            if isinstance(item, str):
                continue
            if not is_image(item):
                raise TypeError(f"item {i} must be a str or an image (PIL image or (c, H, W) "
                                f"tensor), got {type(item).__name__}")
            _check_image(item, i)
        if not isinstance(self.caption_first, bool):
            raise TypeError(f"caption_first must be a bool, got {self.caption_first!r}")
        if (isinstance(self.prompt_items, bool) or not isinstance(self.prompt_items, int)
                or not 0 <= self.prompt_items <= len(self.items)):
            raise ValueError(f"prompt_items must be an int in [0, {len(self.items)}] (the number "
                             f"of items), got {self.prompt_items!r}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"meta must be a dict, got {type(self.meta).__name__}")

    @property
    def num_images(self) -> int:
        """Number of image items."""
        return sum(1 for item in self.items if not isinstance(item, str))

    @property
    def images(self) -> list[Any]:
        """The image items, in order."""
        return [item for item in self.items if not isinstance(item, str)]

    @property
    def texts(self) -> list[str]:
        """The text items, in order."""
        return [item for item in self.items if isinstance(item, str)]

    def __len__(self) -> int:
        return len(self.items)
