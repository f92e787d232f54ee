"""Image files and PIL images in and out of generation (PIL is imported when used).

Shape key: c channels · H height · W width.
"""

from __future__ import annotations

import os

import torch

from mmlayers.data.document import image_to_tensor

__all__ = ["read_image", "to_pil"]


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file → float (3, H, W) in [0, 1] (RGB).

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.png")
        >>> to_pil(torch.ones(3, 2, 4) * 0.5).save(path)
        >>> image = read_image(path)
        >>> tuple(image.shape), round(image[0, 0, 0].item(), 3)   # 128 / 255
        ((3, 2, 4), 0.502)

    Raises:
        ValueError: the file is missing or not a readable image (the path is named).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return image_to_tensor(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {e}") from e


def to_pil(image: torch.Tensor):
    """(3, H, W) or (1, H, W) float in [0, 1] → an 8-bit PIL image (values rounded).

    Examples:
        >>> to_pil(torch.zeros(3, 2, 4)).size
        (4, 2)
    """
    from PIL import Image

    x = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    c, h, w = x.shape
    mode = "RGB" if c == 3 else "L"
    return Image.frombytes(mode, (w, h), bytes(x.permute(1, 2, 0).contiguous().untyped_storage()))
