"""Operators: multi-scale deformable attention and its backends."""

from mmlayers.ops.deform_attn import (
    DeformAttnBackend,
    available_backends,
    explain_backends,
    multi_scale_deformable_attention,
    register_backend,
)

__all__ = [
    "DeformAttnBackend",
    "available_backends",
    "explain_backends",
    "multi_scale_deformable_attention",
    "register_backend",
]
