"""Training policy helpers for ``recipes/train.py`` (memory, not maths).

- LLM gradient checkpointing needs nothing here: ``model.llm.gradient_checkpointing: true``
  makes :class:`~mmlayers.models.MMInterleaved` enable it with
  ``SynchronizerHandle.checkpoint_context_fn`` (the recomputed layers see the images).
- :func:`checkpoint_unet`: diffusers' own gradient checkpointing of the UNet blocks (the
  UNet synchronizers' residuals enter through the UNet's public inputs, so nothing to
  restore).
- :func:`store_frozen_in`: keep the frozen weights in bf16 / fp16 (the trainable ones stay
  fp32 for the optimizer; autocast computes in low precision anyway), or in fp32 (FSDP
  shards groups of one dtype; ``transformers`` loads a checkpoint in its stored dtype,
  fp16 for Vicuna).
"""

from __future__ import annotations

import torch

__all__ = ["checkpoint_unet", "store_frozen_in"]


def checkpoint_unet(model) -> None:
    """Recompute the UNet's blocks in backward (``UNet2DConditionModel``'s public switch)."""
    model.unet.enable_gradient_checkpointing()


def store_frozen_in(model, dtype: str | None) -> None:
    """Cast every parameter with ``requires_grad=False`` to ``dtype`` (``"bf16"``,
    ``"fp16"`` or ``"fp32"``; ``None``: leave as is)."""
    if dtype is None:
        return
    kinds = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in kinds:
        raise ValueError(f"train.frozen_dtype must be null, 'bf16', 'fp16' or 'fp32', got {dtype!r}")
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(kinds[dtype])
