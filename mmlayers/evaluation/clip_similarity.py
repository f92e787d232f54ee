"""CLIP similarity of generated images to their captions and to the real images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["clip_similarity"]


def _features(out: Any) -> torch.Tensor:
    """Projected CLIP features: a tensor, or ``pooler_output`` of newer transformers."""
    feats = out if torch.is_tensor(out) else out.pooler_output
    return torch.nn.functional.normalize(feats.float(), dim=-1)


@torch.no_grad()
def clip_similarity(model: Any, processor: Any, images: Sequence[Any], *,
                    texts: Sequence[str] | None = None,
                    references: Sequence[Any] | None = None,
                    batch_size: int = 32) -> dict[str, float]:
    """Mean cosine similarity of CLIP embeddings, per pair.

    ``clip_text_image`` pairs each image with its text (the similarity the official
    evaluation uses to rerank candidate images); ``clip_image_image`` pairs each image
    with its reference image (the official ``clip_sim_i2i``). Both are cosines in
    [−1, 1], averaged over pairs; multiply by 100 for the usual "CLIP score" scale.

    Args:
        model: a ``transformers`` ``CLIPModel`` (loaded from a local directory).
        processor: its ``CLIPProcessor``.
        images: the generated images (PIL images or anything the processor takes).
        texts: one caption per image, or ``None``.
        references: one real image per generated image, or ``None``.
        batch_size: images per forward pass.

    Returns:
        ``{"clip_text_image": ..., "clip_image_image": ...}`` for the pairings given.

    Raises:
        ValueError: if no pairing is given or lengths differ.
    """
    if texts is None and references is None:
        raise ValueError("clip_similarity needs texts= or references= to pair the images with")
    n = len(images)
    for name, other in (("texts", texts), ("references", references)):
        if other is not None and len(other) != n:
            raise ValueError(f"{name} must have one entry per image ({n}), got {len(other)}")
    device = next(model.parameters()).device

    def image_feats(batch):
        pixels = processor(images=list(batch), return_tensors="pt")["pixel_values"]
        return _features(model.get_image_features(pixel_values=pixels.to(device)))

    sums = {"clip_text_image": 0.0, "clip_image_image": 0.0}
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        feats = image_feats(images[start:stop])
        if texts is not None:
            tok = processor(text=list(texts[start:stop]), return_tensors="pt", padding=True,
                            truncation=True)
            text = _features(model.get_text_features(
                input_ids=tok["input_ids"].to(device),
                attention_mask=tok["attention_mask"].to(device)))
            sums["clip_text_image"] += float((feats * text).sum())
        if references is not None:
            sums["clip_image_image"] += float((feats * image_feats(references[start:stop])).sum())
    keys = [k for k, given in (("clip_text_image", texts), ("clip_image_image", references))
            if given is not None]
    return {k: sums[k] / n for k in keys}
