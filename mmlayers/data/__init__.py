"""Data: interleaved document schema, the shapes corpus, a download-free tokenizer, collation.

Importing needs only torch; PIL, tokenizers and transformers are imported where used.
"""

from mmlayers.data.collate import (
    IGNORE_INDEX,
    InterleavedBatch,
    InterleavedCollator,
    interleaved_labels,
)
from mmlayers.data.document import Document, image_to_tensor, is_image
from mmlayers.data.shapes import (
    COLORS,
    KINDS,
    POSITIONS,
    SHAPES,
    SIZES,
    ImageScore,
    ShapeAttributes,
    ShapesCorpus,
    caption_matches,
    describe_image,
    parse_caption,
    render_shapes,
    score_image,
)
from mmlayers.data.tokenizer import (
    IMAGE_TOKEN,
    SOI_TOKEN,
    ensure_image_tokens,
    image_token_ids,
    word_level_tokenizer,
)

__all__ = [
    "COLORS", "IGNORE_INDEX", "IMAGE_TOKEN", "KINDS", "POSITIONS", "SHAPES", "SIZES",
    "SOI_TOKEN", "Document", "ImageScore", "InterleavedBatch", "InterleavedCollator",
    "ShapeAttributes", "ShapesCorpus", "caption_matches", "describe_image",
    "ensure_image_tokens", "image_to_tensor", "image_token_ids", "interleaved_labels",
    "is_image", "parse_caption", "render_shapes", "score_image", "word_level_tokenizer",
]
