"""Adapters that plug mmlayers into Hugging Face LLMs and diffusers UNets.

Imported lazily: ``import mmlayers.adapters`` does not import transformers or diffusers;
the first use of a name below imports the module that defines it.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "attach_synchronizers": "mmlayers.adapters.llm",
    "SynchronizerHandle": "mmlayers.adapters.llm",
    "ImageContextEncoder": "mmlayers.adapters.diffusion",
    "UNetSynchronizer": "mmlayers.adapters.diffusion",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmlayers.adapters' has no attribute {name!r}")
