"""Operators: multi-scale deformable attention and its backends."""

from mmlayers.ops.deform_attn import (
    DeformAttnBackend,
    _ensure_builtin_backends,
    auto_backend,
    available_backends,
    explain_backends,
    multi_scale_deformable_attention,
    register_backend,
)

_ensure_builtin_backends()

__all__ = [
    "DeformAttnBackend",
    "auto_backend",
    "available_backends",
    "explain_backends",
    "multi_scale_deformable_attention",
    "register_backend",
]
