"""Fixed sine-cosine position embeddings (1-D sequences and 2-D grids).

Shape key: n positions · H W grid height and width · d width.

All tables are computed in float64 and returned as float32 (or the requested dtype),
so they are bit-identical on every device and call. With ``ω_k = T^(−k/K)`` for
``k = 0 … K−1`` (``T = temperature``, 10000 by default):

1-D, ``K = d/2``::

    E[t] = [sin(t·ω_0) … sin(t·ω_{K−1}), cos(t·ω_0) … cos(t·ω_{K−1})]

2-D, ``K = d/4``, row-major over the grid (index ``i·W + j`` is row ``i``, column ``j``),
first half the column coordinate ``x``, second half the row coordinate ``y``::

    E[i·W + j] = [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)]     x = j, y = i

These are the numbers of the MAE / MoCo-v3 tables used by MM-Interleaved. With
``base_size=(H0, W0)`` the coordinates are measured in cells of an ``H0 × W0`` grid laid
over the same image (``x = (j + 0.5)·W0/W − 0.5``), so maps of different resolution
(a feature pyramid) share one coordinate frame; at ``(H, W) == base_size`` this is the
plain table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["sincos_1d", "sincos_2d"]


def _frequencies(num: int, temperature: float) -> torch.Tensor:
    return temperature ** (-torch.arange(num, dtype=torch.float64) / num)


def _check_dim(dim: int, multiple: int, name: str) -> None:
    if not isinstance(dim, int) or dim <= 0 or dim % multiple != 0:
        raise ValueError(f"{name} needs dim to be a positive multiple of {multiple}, got {dim!r}")


def sincos_1d(
    positions: int | Sequence[float] | torch.Tensor,
    dim: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """1-D sine-cosine table (see the module docstring for the formula).

    Args:
        positions: ``n`` (positions ``0 … n−1``) or the positions themselves (any
            real numbers, shape (n,)).
        dim: width d, even.
        temperature: the base ``T`` of the frequencies.

    Returns:
        (n, d) tensor.

    Examples:
        >>> from mmlayers.layers.posembed import sincos_1d
        >>> e = sincos_1d(3, 4)
        >>> e.shape
        torch.Size([3, 4])
        >>> [round(v, 4) for v in e[1].tolist()]  # [sin 1, sin .01, cos 1, cos .01]
        [0.8415, 0.01, 0.5403, 0.9999]
    """
    _check_dim(dim, 2, "sincos_1d")
    if isinstance(positions, int):
        if positions < 0:
            raise ValueError(f"sincos_1d needs a non-negative length, got {positions}")
        pos = torch.arange(positions, dtype=torch.float64)
    else:
        pos = torch.as_tensor(positions).detach().to("cpu", torch.float64)
        if pos.dim() != 1:
            raise ValueError(f"positions must be an int or a 1-D sequence, got shape {tuple(pos.shape)}")
    angles = torch.outer(pos, _frequencies(dim // 2, temperature))
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(device=device, dtype=dtype)


def sincos_2d(
    height: int,
    width: int,
    dim: int,
    *,
    temperature: float = 10000.0,
    base_size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """2-D sine-cosine table for an ``H × W`` grid, rows first.

    Args:
        height: grid height H.
        width: grid width W.
        dim: width d, a multiple of 4.
        temperature: the base ``T`` of the frequencies.
        base_size: ``(H0, W0)``: measure coordinates in cells of this grid instead of
            the table's own (see the module docstring). ``None`` means ``(H, W)``.

    Returns:
        (H·W, d) tensor; ``rearrange(e, "(H W) d -> d H W", H=H)`` gives a map.

    Examples:
        >>> from mmlayers.layers.posembed import sincos_2d
        >>> e = sincos_2d(2, 3, 4)
        >>> e.shape
        torch.Size([6, 4])
        >>> [round(v, 4) for v in e[5].tolist()]  # row 1, column 2: [sin 2, cos 2, sin 1, cos 1]
        [0.9093, -0.4161, 0.8415, 0.5403]
    """
    _check_dim(dim, 4, "sincos_2d")
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"sincos_2d needs a positive integer {name}, got {v!r}")
    y = torch.arange(height, dtype=torch.float64)
    x = torch.arange(width, dtype=torch.float64)
    if base_size is not None:
        h0, w0 = base_size
        y = (y + 0.5) * (h0 / height) - 0.5
        x = (x + 0.5) * (w0 / width) - 0.5
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    omega = _frequencies(dim // 4, temperature)
    ax = torch.outer(xx.flatten(), omega)
    ay = torch.outer(yy.flatten(), omega)
    table = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)
    return table.to(device=device, dtype=dtype)
