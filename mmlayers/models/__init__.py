"""Composite models: MM-Interleaved and its configuration.

Importing needs only torch; ``transformers`` and ``diffusers`` are imported when a model
is built.
"""

from mmlayers.models.config import (
    DecoderConfig,
    LLMConfig,
    LossConfig,
    MMInterleavedConfig,
    TokenConfig,
    VisionConfig,
)
from mmlayers.models.mm_interleaved import MMInterleaved, MMInterleavedOutput

__all__ = ["DecoderConfig", "LLMConfig", "LossConfig", "MMInterleaved", "MMInterleavedConfig",
           "MMInterleavedOutput", "TokenConfig", "VisionConfig"]
