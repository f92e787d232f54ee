"""Log-likelihood of answer options after a prompt (VisDial's ``generate_scores`` mode)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["option_log_likelihoods"]


@torch.no_grad()
def option_log_likelihoods(model: Any, prompt: Sequence[Any], options: Sequence[str], *,
                           tokenizer: Any = None, batch_size: int = 8,
                           max_length: int = 2048) -> torch.Tensor:
    """Sum of the log-probabilities of each option's tokens after an interleaved prompt.

    The official VisDial evaluation scores each of the 100 answer options this way (no
    length normalisation) and ranks the options by the score. Each option is appended to
    the prompt's last text with a space; the option's tokens are those after the
    prompt's tokens (the closing ``</s>`` is not counted).

    Args:
        model: an [`MMInterleaved`][mmlayers.models.mm_interleaved.MMInterleaved] in eval mode.
        prompt: text and image items; the last one must be text.
        options: the candidate continuations.
        tokenizer: default the model's.
        batch_size: options per forward pass.
        max_length: longest prompt + option in tokens.

    Returns:
        (options,) float32 scores, higher is more likely.

    Raises:
        ValueError: if the prompt does not end with text, an option is empty, or the
            tokenizer does not tokenize prompt + option as the prompt's tokens followed
            by the option's.
    """
    from mmlayers.data import Document, InterleavedCollator

    tokenizer = model._tokenizer(tokenizer)
    if not prompt or not isinstance(prompt[-1], str):
        raise ValueError("the prompt's last item must be text (options continue it)")
    collate = InterleavedCollator(tokenizer=tokenizer, max_length=max_length, pack=False,
                                  truncate=False,
                                  num_image_tokens=model.config.vision.num_tokens)
    head = list(prompt[:-1])
    context = collate([Document(head + [prompt[-1]])]).input_ids[0]
    n_ctx = len(context) - 1  # without </s>
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(options), batch_size):
        chunk = list(options[start:start + batch_size])
        if any(not isinstance(o, str) or not o.strip() for o in chunk):
            raise ValueError(f"options must be non-empty strings, got {chunk!r}")
        batch = collate([Document(head + [f"{prompt[-1]} {o}"]) for o in chunk])
        ids = batch.input_ids
        if not torch.equal(ids[:, :n_ctx], context[:n_ctx].expand(len(chunk), -1)):
            raise ValueError("the tokenizer does not tokenize prompt + option as the prompt's "
                             "tokens followed by the option's")
        logits = model(batch.to(device)).logits.float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        ends = batch.attention_mask.sum(1) - 1  # position of each row's </s>
        pos = torch.arange(1, ids.shape[1])[None, :]
        keep = (pos >= n_ctx) & (pos < ends[:, None])
        scores.append((logp.cpu() * keep).sum(1))
    return torch.cat(scores)
