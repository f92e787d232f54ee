"""Standalone layers (one idea per module), re-exported flat: ``from mmlayers.layers import X``."""


from mmlayers.layers.deformable_attention import MultiScaleDeformableAttention
from mmlayers.layers.hf_vit import ViTBackbone, as_vit_backbone
from mmlayers.layers.posembed import official_sincos_2d, resize_pos_table, sincos_1d, sincos_2d
from mmlayers.layers.pyramid import (
    AdapterOutput,
    SimpleFeaturePyramid,
    ViTAdapterPyramid,
    split_depth,
)
from mmlayers.layers.qformer import QFormerResampler
from mmlayers.layers.resampler import PerceiverResampler
from mmlayers.layers.synchronizer import (
    FeatureSynchronizer,
    PreparedValues,
    relative_image_positions,
)
from mmlayers.layers.visibility import image_starts, image_visibility, previous_image_visibility

__all__ = [
    "AdapterOutput",
    "FeatureSynchronizer",
    "MultiScaleDeformableAttention",
    "PerceiverResampler",
    "PreparedValues",
    "QFormerResampler",
    "SimpleFeaturePyramid",
    "ViTAdapterPyramid",
    "ViTBackbone",
    "as_vit_backbone",
    "image_starts",
    "image_visibility",
    "official_sincos_2d",
    "previous_image_visibility",
    "relative_image_positions",
    "resize_pos_table",
    "sincos_1d",
    "sincos_2d",
    "split_depth",
]
