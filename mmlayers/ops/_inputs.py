"""Validated inputs of multi-scale deformable attention, shared by every backend.

Shape key: b batch · n queries · s flattened value tokens (all levels) · h heads ·
dh head width · l levels · p sampling points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ShapesLike = torch.Tensor | Sequence[Sequence[int]]


@dataclass(frozen=True)
class DeformAttnInputs:
    """Validated arguments handed to a backend.

    ``shapes`` holds the level sizes as Python ints, so backends never read them from
    the device.
    """

    value: torch.Tensor
    shapes: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor


def _as_shapes(spatial_shapes: ShapesLike) -> tuple[tuple[int, int], ...]:
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dtype.is_floating_point or spatial_shapes.dtype.is_complex:
            raise TypeError(
                f"spatial_shapes must hold integers, got dtype {spatial_shapes.dtype}; "
                "expected a long tensor of shape (l, 2) with rows (H, W)"
            )
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[-1] != 2:
            raise ValueError(
                f"spatial_shapes must have shape (l, 2) with rows (H, W), "
                f"got {tuple(spatial_shapes.shape)}"
            )
        # One tiny device-to-host copy when the tensor lives on an accelerator.
        rows = spatial_shapes.tolist()
    else:
        rows = [tuple(r) for r in spatial_shapes]
    shapes = []
    for i, row in enumerate(rows):
        if len(row) != 2:
            raise ValueError(f"spatial_shapes[{i}] must be (H, W), got {row!r}")
        hw = []
        for v in row:
            if isinstance(v, bool) or not isinstance(v, int | torch.SymInt):
                if isinstance(v, float) and v.is_integer():
                    raise TypeError(
                        f"spatial_shapes[{i}] = {row!r} holds floats; expected integers (H, W)"
                    )
                raise TypeError(f"spatial_shapes[{i}] = {row!r}: expected integers (H, W)")
            hw.append(v)
        if hw[0] < 1 or hw[1] < 1:
            raise ValueError(f"spatial_shapes[{i}] = {row!r}: H and W must be >= 1")
        shapes.append((hw[0], hw[1]))
    if not shapes:
        raise ValueError("spatial_shapes is empty; expected at least one level (l >= 1)")
    return tuple(shapes)


def _validate(
    value: torch.Tensor,
    spatial_shapes: ShapesLike,
    level_start_index: torch.Tensor | Sequence[int] | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> DeformAttnInputs:
    for name, t in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if value.dim() != 4:
        raise ValueError(f"value must have shape (b, s, h, dh), got {tuple(value.shape)}")
    b, s, h, _ = value.shape
    shapes = _as_shapes(spatial_shapes)
    n_levels = len(shapes)
    total = sum(hh * ww for hh, ww in shapes)
    if total != s:
        raise ValueError(
            f"spatial_shapes {list(shapes)} cover Σ H·W = {total} tokens but value has "
            f"s = {s} (value shape {tuple(value.shape)}); expected them to be equal"
        )
    starts = tuple(int(x) for x in _cumsum0([hh * ww for hh, ww in shapes]))
    if level_start_index is not None:
        if isinstance(level_start_index, torch.Tensor):
            if level_start_index.shape != (n_levels,):
                raise ValueError(
                    f"level_start_index must have shape ({n_levels},) to match spatial_shapes, "
                    f"got {tuple(level_start_index.shape)}"
                )
            if level_start_index.device.type == "cpu":
                given = tuple(int(x) for x in level_start_index.tolist())
            else:  # do not sync the device just to re-check a derived quantity
                given = starts
        else:
            given = tuple(int(x) for x in level_start_index)
        if len(given) != n_levels:
            raise ValueError(
                f"level_start_index has {len(given)} entries but spatial_shapes has "
                f"{n_levels} levels"
            )
        if given != starts:
            raise ValueError(
                f"level_start_index {list(given)} does not match spatial_shapes {list(shapes)}; "
                f"expected the exclusive cumulative sum {list(starts)}"
            )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must have shape (b, n, h, l, p, 2), "
            f"got {tuple(sampling_locations.shape)}"
        )
    bl, n, hl, ll, p, _ = sampling_locations.shape
    if (bl, hl, ll) != (b, h, n_levels):
        raise ValueError(
            f"sampling_locations has shape {tuple(sampling_locations.shape)}; expected "
            f"(b={b}, n, h={h}, l={n_levels}, p, 2) from value {tuple(value.shape)} and "
            f"{n_levels} spatial_shapes"
        )
    expected_w = (b, n, h, n_levels, p)
    if tuple(attention_weights.shape) != expected_w:
        raise ValueError(
            f"attention_weights must have shape (b, n, h, l, p) = {expected_w}, "
            f"got {tuple(attention_weights.shape)}"
        )
    devices = {t.device for t in (value, sampling_locations, attention_weights)}
    if len(devices) != 1:
        raise ValueError(
            "value, sampling_locations and attention_weights must be on one device, got "
            f"{value.device}, {sampling_locations.device} and {attention_weights.device}"
        )
    return DeformAttnInputs(value, shapes, starts, sampling_locations, attention_weights)


def _cumsum0(xs: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        out.append(acc)
        acc += x
    return out


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the dtype of coordinate and weight maths."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def float_dtype_reasons(inputs: DeformAttnInputs) -> list[str]:
    """Reasons shared by the CPU backends: supported value dtypes."""
    ok = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    why = []
    for name in ("value", "sampling_locations", "attention_weights"):
        dt = getattr(inputs, name).dtype
        if dt not in ok:
            why.append(f"{name} dtype {dt} is not one of {[str(d) for d in ok]}")
    return why

