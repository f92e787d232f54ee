"""Image files and PIL images in and out of generation (PIL is imported when used).

Shape key: c channels · H height · W width.
"""

from __future__ import annotations

import os

import torch

from mmlayers._optional import require
from mmlayers.data.document import image_to_tensor, is_image

__all__ = ["as_rgb_tensor", "read_image", "to_pil"]


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
    require("PIL", "data")
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
    require("PIL", "data")
    from PIL import Image

    x = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    c, h, w = x.shape
    mode = "RGB" if c == 3 else "L"
    return Image.frombytes(mode, (w, h), bytes(x.permute(1, 2, 0).contiguous().untyped_storage()))


def as_rgb_tensor(image) -> torch.Tensor:
    """A PIL image, a (c, H, W) tensor in [0, 1] (c = 1 or 3) or an image file path → float
    (3, H, W) in [0, 1].

    Raises:
        TypeError: anything else. ValueError: an unreadable file or a tensor of another
            shape or range.

    Examples:
        >>> as_rgb_tensor(torch.full((1, 2, 2), 0.5)).shape
        torch.Size([3, 2, 2])
    """
    if isinstance(image, (str, os.PathLike)):
        tensor = read_image(image)
    elif is_image(image):
        tensor = image_to_tensor(image)
    else:
        raise TypeError(f"image must be a PIL image, a (c, H, W) tensor or a path, got "
                        f"{type(image).__name__}")
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3) or not tensor.numel() \
            or bool(tensor.min() < 0) or bool(tensor.max() > 1):
        raise ValueError(f"an image tensor must be (c in {{1, 3}}, H, W) in [0, 1], got "
                         f"shape {tuple(tensor.shape)}")
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor
