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
from mmlayers.models.decoding import SamplingConfig, TextResult, beam_search, choose_token
from mmlayers.models.memory import build_on_meta, parameter_report
from mmlayers.models.mm_interleaved import MMInterleaved, MMInterleavedOutput
from mmlayers.models.official import convert_official_state_dict
from mmlayers.models.session import InterleavedSession

__all__ = ["DecoderConfig", "InterleavedSession", "LLMConfig", "LossConfig", "MMInterleaved",
           "MMInterleavedConfig", "MMInterleavedOutput", "SamplingConfig", "TextResult",
           "TokenConfig", "VisionConfig", "beam_search", "build_on_meta", "choose_token",
           "convert_official_state_dict", "parameter_report"]
