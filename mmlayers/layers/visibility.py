"""Which images each token (or each image) of an interleaved sequence may see.

Shape key: b batch · n tokens · m images (the most images in any row; columns beyond a
row's own images are all False).

An image is ``<soi>`` followed by its ``<image>`` slots; image k of a row starts at the
k-th ``<image>`` token that directly follows a ``<soi>`` (a trailing ``<soi>`` with no
``<image>`` after it opens no image yet). A row may pack several documents, each opened by
``<s>``; a document never sees another document's images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["image_starts", "image_visibility", "previous_image_visibility"]


def _check(input_ids: torch.Tensor, ids: dict[str, int | None]) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor of shape (b, n), got "
                         f"{input_ids.dtype} of shape {tuple(input_ids.shape)}")
    for name, v in ids.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{name} must be an int token id, got {v!r}")


def image_starts(input_ids: torch.Tensor, *, soi_id: int, image_id: int,
                 m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of the first ``<image>`` token of every image.

    Args:
        input_ids: (b, n) token ids.
        soi_id: id of ``<soi>``.
        image_id: id of ``<image>``.
        m: number of image columns; default the most images in any row (one device→host
            copy). Rows with fewer images get position ``n`` (never reached) in the rest.

    Returns:
        ``(starts, num_images)``: (b, m) long positions and (b,) long image counts.

    Examples:
        >>> import torch
        >>> ids = torch.tensor([[1, 5, 7, 7, 9, 5, 7, 7]])  # <s> <soi> <image>×2 x <soi> …
        >>> starts, count = image_starts(ids, soi_id=5, image_id=7)
        >>> starts.tolist(), count.tolist()
        ([[2, 6]], [2])
    """
    _check(input_ids, {"soi_id": soi_id, "image_id": image_id})
    b, n = input_ids.shape
    is_start = F.pad((input_ids[:, 1:] == image_id) & (input_ids[:, :-1] == soi_id), (1, 0))
    num_images = is_start.sum(1)
    if m is None:
        m = int(num_images.max()) if b else 0
    column = torch.where(is_start, is_start.long().cumsum(1) - 1, m)  # image index or sink
    column = column.clamp(max=m)  # images beyond m columns are dropped
    pos = torch.arange(n, device=input_ids.device).expand(b, n)
    starts = torch.full((b, m + 1), n, dtype=torch.long, device=input_ids.device)
    starts = starts.scatter(1, column, torch.where(is_start, pos, n))
    return starts[:, :m], num_images


def _latest_bos(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(b, n) position of the latest ``<s>`` at or before each token, −1 if none."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(input_ids == bos_id, pos, -1).cummax(1).values


def image_visibility(input_ids: torch.Tensor, *, soi_id: int, image_id: int, bos_id: int,
                     pad_id: int | None = None, m: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which images each token may read (the LLM's synchronizer mask).

    Token t sees image k iff k's first ``<image>`` token is at a position ≤ t and after the
    latest ``<s>`` at or before t. So ``<soi>`` does not see the image it opens, the image's
    own ``<image>`` tokens do, and packed documents do not see each other's images.
    Padding tokens (``pad_id``) see nothing. During cached decoding use the last row.

    Args:
        input_ids: (b, n) token ids.
        soi_id: id of ``<soi>``.
        image_id: id of ``<image>``.
        bos_id: id of ``<s>``.
        pad_id: id of padding tokens, or ``None``.
        m: image columns (see [`image_starts`][mmlayers.layers.visibility.image_starts]); default the most images in any row.

    Returns:
        ``(visibility, num_images)``: (b, n, m) bool and (b,) long images per row (images
        numbered in order of appearance).

    Examples:
        >>> import torch
        >>> S, SOI, IMG, x = 1, 5, 7, 9
        >>> ids = torch.tensor([[S, x, SOI, IMG, IMG, x, S, SOI, IMG, x]])
        >>> vis, count = image_visibility(ids, soi_id=SOI, image_id=IMG, bos_id=S)
        >>> vis[0].int().T.tolist()  # rows: images, columns: tokens
        [[0, 0, 0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]]
    """
    _check(input_ids, {"bos_id": bos_id, "pad_id": pad_id})
    starts, num_images = image_starts(input_ids, soi_id=soi_id, image_id=image_id, m=m)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :, None]
    bos = _latest_bos(input_ids, bos_id)[..., None]
    vis = (starts[:, None, :] <= pos) & (starts[:, None, :] > bos)
    if pad_id is not None:
        vis = vis & (input_ids != pad_id)[..., None]
    return vis, num_images


def previous_image_visibility(input_ids: torch.Tensor, *, soi_id: int, image_id: int,
                              bos_id: int, m: int | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which images each image may read (the image decoder's synchronizer mask).

    Image k sees only image k − 1, and only when both are in the same segment (no ``<s>``
    between k − 1's ``<soi>`` and k's ``<soi>``). The UNet that generates image k reads the
    pyramid of that single preceding image; the first image of a segment sees nothing.

    Args:
        input_ids: (b, n) token ids.
        soi_id: id of ``<soi>``.
        image_id: id of ``<image>``.
        bos_id: id of ``<s>``.
        m: image columns (see [`image_starts`][mmlayers.layers.visibility.image_starts]).

    Returns:
        ``(visibility, num_images)``: (b, m, m) bool, row k = image k, at most one True per
        row (``visibility.float().argmax(-1)`` is the source image where ``any(-1)``), and
        (b,) long images per row.

    Examples:
        >>> import torch
        >>> S, SOI, IMG, x = 1, 5, 7, 9
        >>> ids = torch.tensor([[S, SOI, IMG, x, SOI, IMG, S, SOI, IMG, SOI, IMG]])
        >>> vis, _ = previous_image_visibility(ids, soi_id=SOI, image_id=IMG, bos_id=S)
        >>> vis[0].int().tolist()
        [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]
    """
    _check(input_ids, {"bos_id": bos_id})
    starts, num_images = image_starts(input_ids, soi_id=soi_id, image_id=image_id, m=m)
    b, n = input_ids.shape
    m = starts.shape[1]
    bos = F.pad(_latest_bos(input_ids, bos_id), (0, 1), value=-2)  # position n: sentinel
    segment = bos.gather(1, starts)  # (b, m) latest <s> before each image (-2: no image)
    same = (segment[:, 1:] == segment[:, :-1]) & (starts[:, 1:] < n)
    vis = torch.zeros(b, m, m, dtype=torch.bool, device=input_ids.device)
    if m > 1:
        vis[:, 1:, :-1] = torch.diag_embed(same)
    return vis, num_images
