"""Adapters that plug mmlayers into Hugging Face LLMs and diffusers UNets.

Imported lazily: ``import mmlayers.adapters`` does not import transformers or diffusers;
the first use of a name below imports the module that defines it.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "attach_synchronizers": "mmlayers.adapters.llm",
    "SynchronizerHandle": "mmlayers.adapters.llm",
    "SynchronizerBlock": "mmlayers.adapters.llm",
    "ImageTokens": "mmlayers.adapters.image_tokens",
    "add_image_tokens": "mmlayers.adapters.image_tokens",
    "prepare_for_training": "mmlayers.adapters.policy",
    "trainable_parameters": "mmlayers.adapters.policy",
    "parameter_groups": "mmlayers.adapters.policy",
    "save_adapter": "mmlayers.adapters.policy",
    "load_adapter": "mmlayers.adapters.policy",
    "ImageContextEncoder": "mmlayers.adapters.diffusion",
    "UNetSynchronizer": "mmlayers.adapters.diffusion",
    "SkipSynchronizer": "mmlayers.adapters.diffusion",
    "ImageGenerator": "mmlayers.adapters.diffusion",
    "ImageContexts": "mmlayers.adapters.diffusion",
    "image_contexts": "mmlayers.adapters.diffusion",
    "diffusion_loss": "mmlayers.adapters.diffusion",
    "encode_latents": "mmlayers.adapters.diffusion",
    "unet_extra_inputs": "mmlayers.adapters.diffusion",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmlayers.adapters' has no attribute {name!r}")
