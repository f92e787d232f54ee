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

from mmlayers.ops._inputs import (  # noqa: F401  (backends import these from here)
    DeformAttnInputs,
    ShapesLike,
    _as_shapes,
    _cumsum0,
    _validate,
    compute_dtype,
    float_dtype_reasons,
)

__all__ = [
    "DeformAttnBackend",
    "auto_backend",
    "available_backends",
    "explain_backends",
    "multi_scale_deformable_attention",
    "register_backend",
]

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
