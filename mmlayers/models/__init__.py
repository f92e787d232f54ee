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
from mmlayers.models.memory import build_on_meta, parameter_report
from mmlayers.models.mm_interleaved import MMInterleaved, MMInterleavedOutput

__all__ = ["DecoderConfig", "LLMConfig", "LossConfig", "MMInterleaved", "MMInterleavedConfig",
           "MMInterleavedOutput", "TokenConfig", "VisionConfig", "build_on_meta",
           "parameter_report"]
