"""Whole turns of an [`InterleavedSession`][mmlayers.models.session.InterleavedSession]: ``run`` and
``stream`` (the model decides when to draw an image)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from mmlayers.models.decoding import SamplingConfig

__all__ = ["TurnsMixin"]


class TurnsMixin:
    """``run()`` / ``stream()`` on top of the session's ``generate_text`` / ``generate_image``."""

    def run(self, max_turns: int = 4, *, max_new_tokens: int = 32,
            image_kwargs: dict | None = None, **text_kwargs) -> list[Any]:
        """Let the model write: per turn, text until it stops; if it opened an image,
        draw it. Stops at ``</s>`` or after ``max_turns`` turns.

        Returns:
            the new items: text (``str``) and PIL images, in order.
        """
        out: list[Any] = []
        for _ in range(max_turns):
            result = self.generate_text(max_new_tokens, **text_kwargs)
            if result.text:
                out.append(result.text)
            if result.image_opened:
                out.append(self.generate_image(**(image_kwargs or {})))
            elif result.finished or len(self.ids) >= self.max_length:
                break
        return out

    def stream(self, max_turns: int = 4, *, max_new_tokens: int = 32,
               image_kwargs: dict | None = None, do_sample: bool = False,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               generator: torch.Generator | None = None,
               allow_image: bool | None = None,
               repetition_penalty: float = 1.0) -> Iterator[Any]:
        """[`run`][mmlayers.models._turns.TurnsMixin.run], yielding text pieces as tokens are decoded and each image when it
        is finished (greedy or sampling; no beams). A caller that stops reading keeps a
        consistent document: the text decoded so far is part of it."""
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, repetition_penalty)
        for _ in range(max_turns):
            max_new, allow = self._start_text(max_new_tokens, allow_image)
            tokens, shown, complete = [], "", False
            try:
                for token in self._tokens(max_new, allow, sampling, generator):
                    tokens.append(token)
                    if token in (self.tok.eos_id, self.tok.soi_id):
                        break
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    if text.startswith(shown) and len(text) > len(shown):
                        yield text[len(shown):]
                        shown = text
                complete = True
            finally:
                if not complete:  # the caller stopped reading: keep what was written
                    self._result(tokens)
            result = self._result(tokens)
            if len(result.text) > len(shown) and result.text.startswith(shown):
                yield result.text[len(shown):]
            if result.image_opened:
                yield self.generate_image(**(image_kwargs or {}))
            elif result.finished or len(self.ids) >= self.max_length:
                return
