"""The ``"triton"`` backend: fused forward and backward GPU kernels, JIT-compiled.

Shape key: b batch · n queries · s value tokens · h heads · dh head width · l levels ·
p sampling points · m images (groups of consecutive levels).

No build step: the kernels in `mmlayers.ops._triton_kernels` are compiled by Triton
on first use. Triton is imported lazily, only when the kernels run, so ``import
mmlayers`` works without it.

CPU: with ``TRITON_INTERPRET=1`` the kernels run in the Triton interpreter (slow; that is
how the tests check them without a GPU). Triton fixes the mode when ``triton.language``
is *imported* (its own helpers such as ``tl.sum`` are decorated then), so the variable
must be set before the first ``import triton`` in the process; this backend checks that
and says so instead of failing inside the interpreter. Under ``TRITON_INTERPRET=1``
``"auto"`` also picks this backend for CPU tensors (priority 20), so set it only in
processes meant to exercise the kernels.

Numerics: locations, bilinear weights and the output accumulator are fp32 (fp64 for
fp64 inputs) whatever the value dtype; value gradients are accumulated by atomic adds in
an fp32 (fp64) workspace and cast to the value dtype once. The op is registered with
``torch.library.custom_op`` (forward, backward, fake implementations and the autograd
formula), so it runs inside ``torch.compile`` graphs as one opaque node. Double
backward is not supported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mmlayers.ops.deform_attn import (
    DeformAttnBackend,
    DeformAttnInputs,
    compute_dtype,
    register_backend,
)

__all__ = ["KERNEL_CONFIG", "KernelConfig", "interpreter_enabled",
           "triton_deformable_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class KernelConfig:
    """Launch knobs (tuning only; results do not depend on them).

    ``*_tile`` bounds the elements of one (BLOCK_N, BLOCK_P, BLOCK_D) gather tile, which
    sets how many queries one program owns; ``*_warps`` is Triton's ``num_warps``. With
    the defaults an offline sm_90 build of dh 32 / p 4 and dh 64 / p 8 does not spill
    registers (``cuobjdump -res-usage``); they have not been timed on a GPU yet.
    ``recipes/benchmark.py triton_ops --sweep`` times alternatives.
    """

    fwd_tile: int = 1024
    fwd_warps: int = 4
    bwd_tile: int = 1024
    bwd_warps: int = 8


#: The configuration every launch reads; change its fields to tune.
KERNEL_CONFIG = KernelConfig()


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value (read now, like Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on", "yes"}


def _triton_interprets() -> bool:
    """Whether triton.language was imported in interpreter mode (imports triton)."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


def _triton_missing() -> str | None:
    from importlib.util import find_spec

    return None if find_spec("triton") is not None else "triton is not installed"


_KERNELS: dict[bool, tuple] = {}


def _kernels(interpret: bool) -> tuple:
    """(forward, backward) kernels wrapped for the interpreter or the compiler."""
    if interpret not in _KERNELS:
        from mmlayers.ops import _triton_kernels as src

        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            from triton.runtime.jit import JITFunction as wrap
        _KERNELS[interpret] = (wrap(src.deform_attn_fwd_kernel),
                               wrap(src.deform_attn_bwd_kernel))
    return _KERNELS[interpret]


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _blocks(n: int, p: int, dh: int, tile: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_P, BLOCK_D): powers of two, about ``tile`` gathered elements."""
    block_p, block_d = max(2, _pow2(p)), max(4, _pow2(dh))
    block_n = max(1, min(64, _pow2(n), tile // (block_p * block_d)))
    block_n = 1 << (block_n.bit_length() - 1)  # round down to a power of two
    return block_n, block_p, block_d


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _vis_args(vis: torch.Tensor | None, n_levels: int, like: torch.Tensor) -> tuple:
    if vis is None:
        return like, 1, 0, 0, 0, False
    m = vis.shape[-1]
    return (vis, n_levels // m, vis.stride(0), vis.stride(1), vis.stride(2), True)


def _launch_meta(value: torch.Tensor, loc: torch.Tensor, attn: torch.Tensor):
    b, s, h, dh = value.shape
    n, n_levels, p = loc.shape[1], loc.shape[3], loc.shape[4]
    compute = compute_dtype(value, loc, attn)
    return b, s, h, dh, n, n_levels, p, compute


@torch.library.custom_op("mmlayers::triton_deform_attn_fwd", mutates_args=())
def _fwd_op(value: torch.Tensor, meta: torch.Tensor, loc: torch.Tensor, attn: torch.Tensor,
            vis: torch.Tensor | None) -> torch.Tensor:
    b, s, h, dh, n, n_levels, p, compute = _launch_meta(value, loc, attn)
    out = value.new_empty((b, n, h * dh))
    if n == 0 or b * h * dh == 0:
        return out.zero_()
    fwd, _ = _kernels(interpreter_enabled())
    block_n, block_p, block_d = _blocks(n, p, dh, KERNEL_CONFIG.fwd_tile)
    vis_t, per_group, vsb, vsn, vsm, has_vis = _vis_args(vis, n_levels, meta)
    grid = (_cdiv(n, block_n) * b * h,)
    fwd[grid](value, meta, loc, attn, vis_t, out,
              n, s, h, dh, n_levels, p, per_group, vsb, vsn, vsm,
              HAS_VIS=has_vis, COMPUTE=_tl_dtype(compute),
              BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_D=block_d,
              num_warps=KERNEL_CONFIG.fwd_warps, enable_fp_fusion=True)
    return out


@_fwd_op.register_fake
def _fwd_fake(value, meta, loc, attn, vis):
    b, _, h, dh = value.shape
    return value.new_empty((b, loc.shape[1], h * dh))


@torch.library.custom_op("mmlayers::triton_deform_attn_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, value: torch.Tensor, meta: torch.Tensor,
            loc: torch.Tensor, attn: torch.Tensor, vis: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, h, dh, n, n_levels, p, compute = _launch_meta(value, loc, attn)
    grad_value = torch.zeros(value.shape, dtype=compute, device=value.device)
    grad_loc = torch.empty_like(loc)
    grad_attn = torch.empty_like(attn)
    if n == 0 or b * h * dh == 0:
        return grad_value.to(value.dtype), grad_loc.zero_(), grad_attn.zero_()
    _, bwd = _kernels(interpreter_enabled())
    block_n, block_p, block_d = _blocks(n, p, dh, KERNEL_CONFIG.bwd_tile)
    vis_t, per_group, vsb, vsn, vsm, has_vis = _vis_args(vis, n_levels, meta)
    grid = (_cdiv(n, block_n) * b * h,)
    bwd[grid](grad_out.contiguous(), value, meta, loc, attn, vis_t,
              grad_value, grad_loc, grad_attn,
              n, s, h, dh, n_levels, p, per_group, vsb, vsn, vsm,
              HAS_VIS=has_vis, COMPUTE=_tl_dtype(compute),
              BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_D=block_d,
              num_warps=KERNEL_CONFIG.bwd_warps, enable_fp_fusion=True)
    return grad_value.to(value.dtype), grad_loc, grad_attn


@_bwd_op.register_fake
def _bwd_fake(grad_out, value, meta, loc, attn, vis):
    return torch.empty_like(value), torch.empty_like(loc), torch.empty_like(attn)


def _setup_context(ctx, inputs, output) -> None:
    value, meta, loc, attn, vis = inputs
    ctx.save_for_backward(value, meta, loc, attn, vis)


def _backward(ctx, grad_out):
    value, meta, loc, attn, vis = ctx.saved_tensors
    gv, gl, ga = _bwd_op(grad_out, value, meta, loc, attn, vis)
    return (gv if ctx.needs_input_grad[0] else None, None,
            gl if ctx.needs_input_grad[2] else None,
            ga if ctx.needs_input_grad[3] else None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_META_CACHE: dict[tuple, torch.Tensor] = {}


def _meta_tensor(shapes: tuple[tuple[int, int], ...], starts: tuple[int, ...],
                 device: torch.device) -> torch.Tensor:
    """(l, 3) int32 rows (H, W, start) on ``device``, cached so that repeated calls with
    the same level layout do no host-to-device copy."""
    key = (shapes, starts, str(device))
    cached = _META_CACHE.get(key)
    if cached is None or torch.compiler.is_compiling():
        rows = [(hh, ww, st) for (hh, ww), st in zip(shapes, starts, strict=True)]
        cached = torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)
        if not torch.compiler.is_compiling():
            if len(_META_CACHE) > 64:
                _META_CACHE.clear()
            _META_CACHE[key] = cached
    return cached


def _device_reasons(device: torch.device) -> list[str]:
    wanted = interpreter_enabled()
    if device.type != "cuda" and not wanted:
        return [f"tensors are on {device.type}; the triton backend needs CUDA "
                "(or TRITON_INTERPRET=1, set before triton is imported, to run its "
                "kernels in the interpreter)"]
    if _triton_interprets() != wanted:
        now, then = ("set", "unset") if wanted else ("unset", "set")
        return [f"TRITON_INTERPRET is {now} now but was {then} when triton was imported; "
                "triton fixes the mode at import, so set it before the first import of "
                "triton in this process"]
    return []


def _input_reasons(value: torch.Tensor, loc: torch.Tensor, attn: torch.Tensor) -> list[str]:
    why = _device_reasons(value.device)
    for name, t in (("value", value), ("sampling_locations", loc), ("attention_weights", attn)):
        if t.dtype not in _DTYPES:
            why.append(f"{name} dtype {t.dtype} is not one of {[str(d) for d in _DTYPES]}")
    if value.device.type == "cuda" and torch.float64 in (value.dtype, loc.dtype, attn.dtype):
        cap = torch.cuda.get_device_capability(value.device)
        if cap < (6, 0):
            why.append(f"fp64 atomics need compute capability >= 6.0, got {cap}")
    return why


def triton_deformable_attention(
    value: torch.Tensor,
    shapes: tuple[tuple[int, int], ...] | list[tuple[int, int]],
    starts: tuple[int, ...] | list[int] | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    visibility: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention with the Triton kernels, optionally per image.

    Same quantity as [`mmlayers.ops.multi_scale_deformable_attention`][mmlayers.ops.deform_attn.multi_scale_deformable_attention] (see its
    "Equivalent PyTorch"), differentiable in ``value``, ``sampling_locations`` and
    ``attention_weights``, plus an optional visibility mask for the synchronizer, where the
    ``l`` levels are ``m`` images of ``l / m`` levels each, concatenated.

    Args:
        value: (b, s, h, dh), fp32 / fp16 / bf16 / fp64.
        shapes: ``(H, W)`` per level as Python ints (l of them).
        starts: start of each level in ``s`` as Python ints; ``None`` derives them.
        sampling_locations: (b, n, h, l, p, 2) normalised ``(x, y)``, align_corners=False.
        attention_weights: (b, n, h, l, p).
        visibility: optional (b, n, m) bool/integer mask, ``m`` dividing ``l``: level ``j``
            belongs to image ``j // (l / m)``. An image a query cannot see contributes
            nothing, exactly as if its weights were zero (their gradients are zero too).
            The kernel skips an image outright for a block of queries none of which can
            see it. Broadcast views (``vis[:, None].expand(b, n, m)``) cost nothing.

    Returns:
        (b, n, h·dh) in ``value``'s dtype.

    Raises:
        ValueError: wrong shapes, ``m`` not dividing ``l``, tensors on different devices,
            or on the CPU without ``TRITON_INTERPRET=1`` (set before triton's import).
        TypeError: unsupported dtypes.

    Example (needs a GPU, or ``TRITON_INTERPRET=1`` on CPU)::

        out = triton_deformable_attention(value, [(32, 32), (16, 16)], None, loc, attn,
                                          visibility=vis)  # vis (b, n, m) bool
    """
    from mmlayers.ops.deform_attn import _validate

    inputs = _validate(value, [tuple(r) for r in shapes], starts, sampling_locations,
                       attention_weights)
    vis = None if visibility is None else _check_visibility(visibility, inputs)
    why = _input_reasons(inputs.value, inputs.sampling_locations, inputs.attention_weights)
    if why:
        raise ValueError("triton_deformable_attention cannot run these inputs: "
                         + "; ".join(why))
    return _run(inputs, vis)


def _check_visibility(visibility: torch.Tensor, inputs: DeformAttnInputs) -> torch.Tensor:
    if not isinstance(visibility, torch.Tensor):
        raise TypeError(f"visibility must be a torch.Tensor, got {type(visibility).__name__}")
    if visibility.dtype.is_floating_point or visibility.dtype.is_complex:
        raise TypeError(f"visibility must be bool or integer, got dtype {visibility.dtype}")
    b, n, n_levels = (inputs.value.shape[0], inputs.sampling_locations.shape[1],
                      len(inputs.shapes))
    if visibility.dim() != 3 or tuple(visibility.shape[:2]) != (b, n):
        raise ValueError(f"visibility must have shape (b={b}, n={n}, m), "
                         f"got {tuple(visibility.shape)}")
    m = visibility.shape[2]
    if m < 1 or n_levels % m:
        raise ValueError(f"visibility has m={m} images but there are {n_levels} levels; "
                         "expected m to divide the level count")
    if visibility.device != inputs.value.device:
        raise ValueError(f"visibility is on {visibility.device}, value on "
                         f"{inputs.value.device}; expected one device")
    return visibility.view(torch.uint8) if visibility.dtype == torch.bool else visibility


def _run(inputs: DeformAttnInputs, vis: torch.Tensor | None = None) -> torch.Tensor:
    meta = _meta_tensor(inputs.shapes, inputs.starts, inputs.value.device)
    return _fwd_op(inputs.value.contiguous(), meta, inputs.sampling_locations.contiguous(),
                   inputs.attention_weights.contiguous(), vis)


def _backend_reasons(inputs: DeformAttnInputs) -> list[str]:
    return _input_reasons(inputs.value, inputs.sampling_locations, inputs.attention_weights)


register_backend(DeformAttnBackend(
    name="triton",
    run=_run,
    not_supported_reasons=_backend_reasons,
    priority=20,
    is_available=_triton_missing,
    auto_devices=("cuda",),
))
