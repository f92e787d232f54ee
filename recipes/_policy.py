"""Training policy helpers for ``recipes/train.py`` (memory, not maths).

- :func:`checkpoint_llm`: gradient checkpointing of the LLM's decoder layers that works with
  the feature synchronizers. The synchronizers read the images from a context that
  :class:`~mmlayers.models.MMInterleaved` opens around the LLM call and closes before
  ``backward()``; plain checkpointing would recompute the layers without images (and
  ``torch.utils.checkpoint`` then fails: a different number of tensors saved). Here the
  recomputation re-opens the context that was active during the original forward
  (``SynchronizerHandle.checkpoint_context_fn``, ``torch.utils.checkpoint``'s
  ``context_fn``).
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

__all__ = ["checkpoint_llm", "checkpoint_unet", "store_frozen_in"]


def checkpoint_llm(model) -> None:
    """Enable non-reentrant gradient checkpointing of ``model.llm`` with the images of the
    synchronizers restored during recomputation (what ``llm.gradient_checkpointing: true``
    in the model config does when the model is built)."""
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": model.sync_handle.checkpoint_context_fn})


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
