"""mmlayers: reusable layers for interleaved image-text generative models."""

from mmlayers.layers import MultiScaleDeformableAttention
from mmlayers.ops import multi_scale_deformable_attention

__version__ = "0.1.0.dev0"

__all__ = ["MultiScaleDeformableAttention", "multi_scale_deformable_attention"]
