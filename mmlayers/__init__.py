"""mmlayers: reusable layers for interleaved image-text generative models.

The headline classes are re-exported here; families live in ``mmlayers.ops``,
``mmlayers.layers``, ``mmlayers.adapters`` (Hugging Face / diffusers, imported lazily),
``mmlayers.data`` and ``mmlayers.models``.
"""

from mmlayers.layers import (
    FeatureSynchronizer,
    MultiScaleDeformableAttention,
    PerceiverResampler,
    SimpleFeaturePyramid,
    ViTAdapterPyramid,
    image_visibility,
    previous_image_visibility,
    sincos_1d,
    sincos_2d,
)
from mmlayers.models import MMInterleaved, MMInterleavedConfig
from mmlayers.ops import multi_scale_deformable_attention
from mmlayers.vision import VisualTokenizer, VisualTokenizerOutput

__version__ = "0.1.0.dev0"

__all__ = [
    "FeatureSynchronizer",
    "MMInterleaved",
    "MMInterleavedConfig",
    "MultiScaleDeformableAttention",
    "PerceiverResampler",
    "SimpleFeaturePyramid",
    "ViTAdapterPyramid",
    "VisualTokenizer",
    "VisualTokenizerOutput",
    "image_visibility",
    "multi_scale_deformable_attention",
    "previous_image_visibility",
    "sincos_1d",
    "sincos_2d",
]
