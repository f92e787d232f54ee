"""mmlayers: reusable layers for interleaved image-text generative models."""

from mmlayers.ops import multi_scale_deformable_attention

__version__ = "0.1.0.dev0"

__all__ = ["multi_scale_deformable_attention"]
