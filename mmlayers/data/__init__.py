"""Data: interleaved document schema, the shapes corpus, a download-free tokenizer, collation,
MMC4 / image-text pair readers, token-level packing, mixing and resumable streaming.

Importing needs only torch; PIL, tokenizers and transformers are imported where used.
"""

from mmlayers.data.collate import (
    IGNORE_INDEX,
    InterleavedBatch,
    InterleavedCollator,
    interleaved_labels,
)
from mmlayers.data.document import Document, image_to_tensor, is_image
from mmlayers.data.images import as_rgb_tensor, read_image, to_pil
from mmlayers.data.inference_format import (
    GENERATE_MODES,
    GenerationRequest,
    read_generation_requests,
)
from mmlayers.data.mmc4 import MMC4Reader, load_image
from mmlayers.data.packing import InterleavedStream, PackedRow, RowPacker, StreamingLoader
from mmlayers.data.pairs import IMAGE_EXTENSIONS, PairReader, tar_samples
from mmlayers.data.shapes import (
    COLORS,
    KINDS,
    POSITIONS,
    SHAPES,
    SIZES,
    ImageScore,
    ShapeAttributes,
    caption_matches,
    describe_image,
    parse_caption,
    render_shapes,
    score_image,
)
from mmlayers.data.shapes_corpus import ShapesCorpus
from mmlayers.data.streaming import Mixture, ReadStats, ShardedSource, data_slot
from mmlayers.data.tokenizer import (
    IMAGE_TOKEN,
    SOI_TOKEN,
    ensure_image_tokens,
    image_token_ids,
    word_level_tokenizer,
)

__all__ = [
    "IMAGE_EXTENSIONS", "InterleavedStream", "MMC4Reader", "Mixture", "PackedRow", "PairReader",
    "ReadStats", "RowPacker", "ShardedSource", "StreamingLoader", "data_slot", "load_image",
    "tar_samples",
    "GENERATE_MODES", "GenerationRequest", "as_rgb_tensor", "read_generation_requests",
    "read_image", "to_pil",
    "COLORS", "IGNORE_INDEX", "IMAGE_TOKEN", "KINDS", "POSITIONS", "SHAPES", "SIZES",
    "SOI_TOKEN", "Document", "ImageScore", "InterleavedBatch", "InterleavedCollator",
    "ShapeAttributes", "ShapesCorpus", "caption_matches", "describe_image",
    "ensure_image_tokens", "image_to_tensor", "image_token_ids", "interleaved_labels",
    "is_image", "parse_caption", "render_shapes", "score_image", "word_level_tokenizer",
]
