"""Standalone layers (one idea per module)."""

from mmlayers.layers.deformable_attention import MultiScaleDeformableAttention

__all__ = ["MultiScaleDeformableAttention"]
