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

These are the numbers of the MAE / MoCo-v3 tables used by MM-Interleaved, with the two
halves in the other order (``layout="yx"`` gives the official ``[y|x]`` order). With
``base_size=(H0, W0)`` the coordinates are measured in cells of an ``H0 × W0`` grid laid
over the same image (``x = (j + 0.5)·W0/W − 0.5``), so maps of different resolution
(a feature pyramid) share one coordinate frame; at ``(H, W) == base_size`` this is the
plain table.

Official tables (``pos_table="official"`` in the layers that add 2-D tables): the
MM-Interleaved code computes one square ``G × G`` table once, in float32 arithmetic, with
the row half first ([`official_sincos_2d`][mmlayers.layers.posembed.official_sincos_2d]), stores it in the checkpoint, and
resizes it bicubically (float32, ``align_corners=False``) to every other map size
([`resize_pos_table`][mmlayers.layers.posembed.resize_pos_table]). Resized rows are not the formula evaluated at new
coordinates; loading the stored table reproduces the official numbers exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["accept_stored_table", "official_sincos_1d", "official_sincos_2d", "resize_pos_table",
           "sincos_1d", "sincos_2d"]


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
        device: device of the table.
        dtype: dtype of the table.

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
    layout: str = "xy",
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
        layout: ``"xy"`` (default): column half first, ``[sin x, cos x, sin y, cos y]``;
            ``"yx"``: row half first, ``[sin y, cos y, sin x, cos x]`` (the official order).
        device: device of the table.
        dtype: dtype of the table.

    Returns:
        (H·W, d) tensor; ``rearrange(e, "(H W) d -> d H W", H=H)`` gives a map.

    Examples:
        >>> from mmlayers.layers.posembed import sincos_2d
        >>> e = sincos_2d(2, 3, 4)
        >>> e.shape
        torch.Size([6, 4])
        >>> [round(v, 4) for v in e[5].tolist()]  # row 1, col 2: [sin 2, cos 2, sin 1, cos 1]
        [0.9093, -0.4161, 0.8415, 0.5403]
        >>> [round(v, 4) for v in sincos_2d(2, 3, 4, layout="yx")[5].tolist()]
        [0.8415, 0.5403, 0.9093, -0.4161]
    """
    _check_dim(dim, 4, "sincos_2d")
    if layout not in ("xy", "yx"):
        raise ValueError(f"sincos_2d layout must be 'xy' or 'yx', got {layout!r}")
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
    halves = [ax.sin(), ax.cos(), ay.sin(), ay.cos()]
    if layout == "yx":
        halves = halves[2:] + halves[:2]
    return torch.cat(halves, dim=1).to(device=device, dtype=dtype)


def official_sincos_1d(length: int, dim: int) -> torch.Tensor:
    """The official MM-Interleaved 1-D table of positions ``0 … length−1``, bit for bit.

    The numbers of ``sincos_1d(length, dim)`` up to float32 rounding, computed as the
    official image decoder does for its context (every step in float32; NumPy when
    installed, else torch). The float32 products ``t·ω`` lose precision for large ``t``
    (about 2e-4 at position 2000), so this table, not the exact one, reproduces the
    official context features.

    Args:
        length: number of positions n.
        dim: width d, even.

    Returns:
        (n, d) float32 tensor ``[sin | cos]``; row i of a longer table equals row i here.

    Examples:
        >>> import torch
        >>> from mmlayers.layers.posembed import official_sincos_1d, sincos_1d
        >>> e = official_sincos_1d(3, 4)
        >>> e.dtype, torch.allclose(e, sincos_1d(3, 4), atol=1e-6)
        (torch.float32, True)
    """
    _check_dim(dim, 2, "official_sincos_1d")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"official_sincos_1d needs a non-negative integer length, got {length!r}")
    k = dim // 2
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with transformers
        np = None
    if np is not None:
        omega = np.float32(1.0) / np.power(np.float32(10000.0),
                                           np.arange(k, dtype=np.float32) / np.float32(k))
        ang = np.arange(length, dtype=np.float32)[:, None] * omega[None, :]
        return torch.from_numpy(np.concatenate([np.sin(ang), np.cos(ang)], axis=1))
    omega = 1.0 / torch.pow(10000.0, torch.arange(k, dtype=torch.float32) / k)
    ang = torch.arange(length, dtype=torch.float32)[:, None] * omega[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


def official_sincos_2d(grid: int, dim: int, *, prefix_rows: int = 0) -> torch.Tensor:
    """The official MM-Interleaved 2-D table of a ``grid × grid`` map, bit for bit.

    Same numbers as ``sincos_2d(grid, grid, dim, layout="yx")`` up to float32 rounding,
    but computed the official way: every step (``ω_k = 1 / 10000^(k/K)``, the products
    ``pos·ω`` and their sine and cosine) in float32. NumPy does the arithmetic when it
    is installed, as in the official code, so the rounding is the same; otherwise torch
    float32 ops (which may differ in the last bit).

    Args:
        grid: side G of the square grid.
        dim: width d, a multiple of 4.
        prefix_rows: zero rows in front (the official visual tokenizer keeps one for CLS).

    Returns:
        (prefix_rows + G·G, d) float32 tensor, row-major over the grid, ``[y | x]``.

    Examples:
        >>> import torch
        >>> from mmlayers.layers.posembed import official_sincos_2d, sincos_2d
        >>> e = official_sincos_2d(4, 8, prefix_rows=1)
        >>> e.shape, e.dtype, e[0].abs().max().item()
        (torch.Size([17, 8]), torch.float32, 0.0)
        >>> torch.allclose(e[1:], sincos_2d(4, 4, 8, layout="yx"), atol=1e-6)
        True
    """
    _check_dim(dim, 4, "official_sincos_2d")
    for name, v in (("grid", grid), ("prefix_rows", prefix_rows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "grid" else 0):
            raise ValueError(f"official_sincos_2d needs a {'positive' if name == 'grid' else 'non-negative'} "
                             f"integer {name}, got {v!r}")
    k = dim // 4
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with transformers
        np = None
    if np is not None:
        omega = np.arange(k, dtype=np.float32) / np.float32(k)
        omega = np.float32(1.0) / np.power(np.float32(10000.0), omega)
        rows, cols = np.divmod(np.arange(grid * grid), grid)
        parts = []
        for coord in (rows, cols):  # [y | x], each [sin | cos]
            ang = coord.astype(np.float32)[:, None] * omega[None, :]  # float32 products
            parts += [np.sin(ang), np.cos(ang)]
        table = torch.from_numpy(np.concatenate(parts, axis=1))
    else:
        omega = 1.0 / torch.pow(10000.0, torch.arange(k, dtype=torch.float32) / k)
        rows, cols = torch.arange(grid * grid).div(grid, rounding_mode="floor"), \
            torch.arange(grid * grid) % grid
        parts = []
        for coord in (rows, cols):
            ang = coord.float()[:, None] * omega[None, :]
            parts += [ang.sin(), ang.cos()]
        table = torch.cat(parts, dim=1)
    return torch.cat([table.new_zeros(prefix_rows, dim), table]).contiguous()


def accept_stored_table(module: torch.nn.Module, name: str) -> None:
    """Let ``module.load_state_dict`` load a stored table buffer of another grid size.

    Registers a load-state-dict pre-hook: when the incoming ``name`` tensor is 2-D with the
    buffer's width but another number of rows (an official table of another grid, e.g. the
    visual tokenizer's fixed 16 × 16), the buffer takes the incoming shape before the
    copy; the layer resizes it to each map when used
    ([`resize_pos_table`][mmlayers.layers.posembed.resize_pos_table]).

    Args:
        module: the module that owns the buffer.
        name: the buffer's attribute name.

    Examples:
        >>> import torch
        >>> m = torch.nn.Module()
        >>> m.register_buffer("table", torch.zeros(4, 8))
        >>> accept_stored_table(m, "table")
        >>> _ = m.load_state_dict({"table": torch.ones(16, 8)})
        >>> tuple(m.table.shape)
        (16, 8)
    """
    def hook(mod, state_dict, prefix, *args) -> None:
        new, cur = state_dict.get(prefix + name), getattr(mod, name, None)
        if isinstance(new, torch.Tensor) and isinstance(cur, torch.Tensor) and new.dim() == 2 \
                and cur.dim() == 2 and new.shape[1] == cur.shape[1] and new.shape != cur.shape:
            setattr(mod, name, cur.new_empty(new.shape))

    module.register_load_state_dict_pre_hook(hook)


def resize_pos_table(table: torch.Tensor, size: tuple[int, int] | int, *,
                     prefix_rows: int = 0) -> torch.Tensor:
    """Bicubically resize a stored square table to an ``H × W`` map (official rule).

    The ``G × G`` grid rows after ``prefix_rows`` are resized with
    ``F.interpolate(mode="bicubic", align_corners=False)`` in float32 and cast back to
    the table's dtype; the prefix rows are kept. When ``(H, W) == (G, G)`` the table is
    returned unchanged (no float32 round trip), as in the official code.

    Args:
        table: (prefix_rows + G·G, d) table, rows row-major over the grid.
        size: target (H, W), or one int for a square.
        prefix_rows: leading rows that are not grid cells.

    Returns:
        (prefix_rows + H·W, d) tensor in ``table``'s dtype and device.

    Examples:
        >>> from mmlayers.layers.posembed import official_sincos_2d, resize_pos_table
        >>> t = official_sincos_2d(4, 8)
        >>> resize_pos_table(t, (2, 2)).shape, resize_pos_table(t, 4) is t
        (torch.Size([4, 8]), True)
    """
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"table must be a 2-D tensor (rows, d), got "
                         f"{tuple(getattr(table, 'shape', ())) or type(table).__name__}")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if min(h, w) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    cells = table.shape[0] - prefix_rows
    g = int(round(cells ** 0.5)) if cells > 0 else 0
    if cells < 1 or g * g != cells:
        raise ValueError(f"table must hold prefix_rows={prefix_rows} rows and then a square "
                         f"grid, got {table.shape[0]} rows")
    if (h, w) == (g, g):
        return table
    grid = table[prefix_rows:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    out = out.permute(0, 2, 3, 1).reshape(h * w, -1).to(table.dtype)
    return torch.cat([table[:prefix_rows], out])
