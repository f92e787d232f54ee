"""Multi-scale deformable attention: one signature, several backends.

Shape key: b batch · n queries · s flattened value tokens (all levels) · h heads ·
dh head width · l levels · p sampling points.

Every backend computes the same quantity (Deformable DETR, Zhu et al. 2021)::

    out[b, n, h] = Σ_l Σ_p  A[b, n, h, l, p] · bilinear(V_l[b, :, :, h], loc[b, n, h, l, p])

where ``V_l`` is level ``l`` of ``value`` reshaped to its (H_l, W_l) map and
``bilinear`` samples it at normalised (x, y) ∈ [0, 1] with ``align_corners=False``
semantics and zeros outside the map: exactly ``torch.nn.functional.grid_sample`` with
``mode="bilinear", padding_mode="zeros", align_corners=False`` on ``2·loc − 1``.

Backends live in a small registry (the xformers ``fmha`` pattern): each one says why it
cannot run given inputs, ``"auto"`` takes the first that can, and forcing one that cannot
raises a single error that lists the reasons.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DeformAttnBackend",
    "auto_backend",
    "available_backends",
    "explain_backends",
    "multi_scale_deformable_attention",
    "register_backend",
]

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


@dataclass(frozen=True)
class DeformAttnBackend:
    """A registered implementation of [`multi_scale_deformable_attention`][mmlayers.ops.deform_attn.multi_scale_deformable_attention].

    Attributes:
        name: registry key, e.g. ``"torch"``.
        run: ``run(inputs) -> (b, n, h·dh)`` tensor.
        not_supported_reasons: ``f(inputs) -> list[str]``; empty when the backend can run.
        priority: ``"auto"`` tries backends from the highest priority down.
        is_available: ``f() -> str | None``: why the backend can never run in this
            environment (a missing package), or ``None``.
        auto_devices: device types on which ``"auto"`` may choose the backend (``None``:
            all). A backend outside them still runs when forced by name (e.g. the Triton
            interpreter on the CPU, which is for testing, not speed).
        auto_declines: ``f(inputs) -> list[str]``: why ``"auto"`` passes the backend over
            for inputs it can run, because a lower-priority one is faster there (measured);
            empty when ``"auto"`` may take it. Forcing the backend by name still runs it.
    """

    name: str
    run: Callable[[DeformAttnInputs], torch.Tensor]
    not_supported_reasons: Callable[[DeformAttnInputs], list[str]]
    priority: int = 0
    is_available: Callable[[], str | None] = lambda: None
    auto_devices: tuple[str, ...] | None = None
    auto_declines: Callable[[DeformAttnInputs], list[str]] | None = None


_REGISTRY: dict[str, DeformAttnBackend] = {}


def register_backend(backend: DeformAttnBackend) -> DeformAttnBackend:
    """Add (or replace) a backend in the registry and return it."""
    _REGISTRY[backend.name] = backend
    return backend


_BUILTINS_LOADED = False


def _ensure_builtin_backends() -> None:
    """Import the built-in backends once (``mmlayers.ops`` does it at import time)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    # Imported here, not at module top, so the registry module has no import cycles.
    from mmlayers.ops import _reference, _torch  # noqa: F401

    try:
        from mmlayers.ops import _triton  # noqa: F401
    except ImportError:  # _triton imports triton lazily; a broken install must not break us
        pass
    _BUILTINS_LOADED = True


def available_backends() -> list[str]:
    """Names of the backends whose packages are present here, best first.

    A backend listed here may still decline particular inputs (for example ``"triton"``
    needs CUDA tensors); [`explain_backends`][mmlayers.ops.deform_attn.explain_backends] says why.

    Examples:
        >>> from mmlayers.ops import available_backends
        >>> "reference" in available_backends() and "torch" in available_backends()
        True
    """
    _ensure_builtin_backends()
    ordered = sorted(_REGISTRY.values(), key=lambda b: -b.priority)
    return [b.name for b in ordered if b.is_available() is None]


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


def explain_backends(
    value: torch.Tensor,
    spatial_shapes: ShapesLike,
    level_start_index: torch.Tensor | Sequence[int] | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> dict[str, list[str]]:
    """For each registered backend, the reasons it cannot run these inputs (empty: it can).

    Examples:
        >>> import torch
        >>> from mmlayers.ops import explain_backends
        >>> v = torch.randn(1, 4, 2, 8)
        >>> loc, w = torch.rand(1, 3, 2, 1, 2, 2), torch.rand(1, 3, 2, 1, 2)
        >>> explain_backends(v, [(2, 2)], None, loc, w)["torch"]
        []
    """
    inputs = _validate(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights)
    return _reasons(inputs)


def _auto_choice(inputs: DeformAttnInputs) -> str | None:
    """The backend ``"auto"`` runs for these inputs (``None``: none can): the best one that
    can run them on their device and does not decline them; if all decline, the best."""
    device = inputs.value.device.type
    able = [b for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)
            if (b.auto_devices is None or device in b.auto_devices)
            and b.is_available() is None and not b.not_supported_reasons(inputs)]
    taken = next((b for b in able if b.auto_declines is None or not b.auto_declines(inputs)),
                 able[0] if able else None)
    return None if taken is None else taken.name


def auto_backend(
    value: torch.Tensor,
    spatial_shapes: ShapesLike,
    level_start_index: torch.Tensor | Sequence[int] | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> str | None:
    """The backend that ``backend="auto"`` runs for these inputs (``None``: none can).

    ``"auto"`` takes the highest-priority backend that can run the inputs on their device,
    unless that backend declines them because a lower-priority one is measured to be faster
    there (``DeformAttnBackend.auto_declines``).

    Examples:
        >>> import torch
        >>> from mmlayers.ops import auto_backend
        >>> v = torch.randn(1, 20, 2, 32)
        >>> loc, w = torch.rand(1, 3, 2, 2, 2, 2), torch.rand(1, 3, 2, 2, 2)
        >>> auto_backend(v, [(4, 4), (2, 2)], None, loc, w)
        'torch'
    """
    _ensure_builtin_backends()
    return _auto_choice(_validate(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights))


def _auto_order() -> list[str]:
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def _reasons(inputs: DeformAttnInputs) -> dict[str, list[str]]:
    _ensure_builtin_backends()
    out = {}
    for backend in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        missing = backend.is_available()
        out[backend.name] = [missing] if missing else backend.not_supported_reasons(inputs)
    return out


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: ShapesLike,
    level_start_index: torch.Tensor | Sequence[int] | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted bilinear samples at learned points of several feature maps.

    Args:
        value: (b, s, h, dh) features of all levels, flattened row-major per level and
            concatenated; fp32, fp16, bf16 or fp64.
        spatial_shapes: (l, 2) integer tensor or a sequence of ``(H, W)`` pairs, one per
            level, with ``Σ H·W = s``. Pass Python ints to avoid a device→host copy.
        level_start_index: (l,) start of each level in ``s``; ``None`` derives it. When
            given on the CPU it is checked against ``spatial_shapes``.
        sampling_locations: (b, n, h, l, p, 2) normalised ``(x, y)``; 0 and 1 are the
            outer edges of the map (``align_corners=False``). Points outside read zeros.
        attention_weights: (b, n, h, l, p) weight of each sample (usually a softmax over
            l·p, but any real numbers are accepted).
        backend: ``"reference"``, ``"torch"``, ``"triton"`` or ``"auto"``/``None`` (the best
            backend that supports these inputs).

    Returns:
        (b, n, h·dh) tensor in ``value``'s dtype. Coordinates, bilinear weights and
        accumulation are computed in fp32 (fp64 for fp64 inputs) whatever the value dtype.

    Raises:
        ValueError: wrong ranks or shapes, level counts that disagree, tensors on different
            devices, an unknown backend or a forced backend that cannot run these inputs.
        TypeError: non-tensor or integer inputs, non-integer spatial shapes.

    Equivalent PyTorch::

        out = 0
        for l, (H, W) in enumerate(spatial_shapes):
            v = value[:, start[l]:start[l] + H * W]             # (b, H·W, h, dh)
            v = v.permute(0, 2, 3, 1).reshape(b * h, dh, H, W)
            g = 2 * sampling_locations[:, :, :, l] - 1          # (b, n, h, p, 2)
            g = g.transpose(1, 2).reshape(b * h, n, p, 2)
            smp = F.grid_sample(v, g, align_corners=False)     # (b·h, dh, n, p)
            a = attention_weights[:, :, :, l].transpose(1, 2).reshape(b * h, 1, n, p)
            out = out + (smp * a).sum(-1)                      # (b·h, dh, n)
        out = out.view(b, h * dh, n).transpose(1, 2)

    Examples:
        >>> import torch
        >>> from mmlayers.ops import multi_scale_deformable_attention
        >>> b, h, dh, n, p = 2, 4, 8, 5, 3
        >>> shapes = [(6, 8), (3, 4)]
        >>> value = torch.randn(b, 6 * 8 + 3 * 4, h, dh)
        >>> loc = torch.rand(b, n, h, len(shapes), p, 2)
        >>> w = torch.rand(b, n, h, len(shapes), p).softmax(-1)
        >>> out = multi_scale_deformable_attention(value, shapes, None, loc, w)
        >>> tuple(out.shape)
        (2, 5, 32)
        >>> ref = multi_scale_deformable_attention(value, shapes, None, loc, w,
        ...                                        backend="reference")
        >>> bool(torch.allclose(out, ref, atol=1e-5))
        True
    """
    inputs = _validate(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights)
    _ensure_builtin_backends()
    if backend is None or backend == "auto":
        name = _auto_choice(inputs)
        if name is not None:
            return _REGISTRY[name].run(inputs)
        device = inputs.value.device.type
        reasons = _reasons(inputs)
        for name, why in reasons.items():
            devices = _REGISTRY[name].auto_devices
            if not why and devices is not None and device not in devices:
                reasons[name] = [f"not chosen automatically on {device} (only on "
                                 f"{', '.join(devices)}); pass backend={name!r} to force it"]
        raise ValueError("no deformable-attention backend can run these inputs:\n"
                         + _format_reasons(reasons))
    if backend not in _REGISTRY:
        raise ValueError(
            f"unknown backend {backend!r}; expected one of "
            f"{sorted(_REGISTRY) + ['auto']}"
        )
    chosen = _REGISTRY[backend]
    missing = chosen.is_available()
    why = [missing] if missing else chosen.not_supported_reasons(inputs)
    if why:
        raise ValueError(f"backend {backend!r} cannot run these inputs:\n"
                         + _format_reasons({backend: why}))
    return chosen.run(inputs)


def _format_reasons(reasons: dict[str, list[str]]) -> str:
    return "\n".join(f"  {name}: {'; '.join(why) or 'ok'}" for name, why in reasons.items())


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

