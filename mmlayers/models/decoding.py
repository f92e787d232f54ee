"""Choosing the next token: greedy, sampling (temperature, top-k, top-p) and beam search.

Shape key: B hypotheses (beams) · V vocabulary.

These functions only look at logits; how the logits are computed (a KV cache, a full
forward per step) is the caller's business, so the same search runs on a cached
[`InterleavedSession`][mmlayers.models.session.InterleavedSession] and on a re-encoding oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

__all__ = ["SamplingConfig", "TextResult", "beam_search", "choose_token"]


@dataclass(frozen=True)
class SamplingConfig:
    """How [`choose_token`][mmlayers.models.decoding.choose_token] picks a token.

    Attributes:
        do_sample: draw from the (filtered) distribution; ``False``: greedy arg-max.
        temperature: logits are divided by it before sampling (> 0).
        top_k: keep the k most likely tokens (``None``: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches
            ``top_p`` (nucleus sampling; ``None`` or 1: all).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")


@dataclass
class TextResult:
    """What [`InterleavedSession.generate_text`][mmlayers.models.session.InterleavedSession.generate_text] returns.

    Attributes:
        text: the decoded new text (special tokens left out).
        token_ids: every new token id, including a final ``</s>`` or ``<soi>``.
        image_opened: decoding stopped at ``<soi>``: an image is open.
        finished: decoding stopped at ``</s>``.
    """

    text: str
    token_ids: list[int]
    image_opened: bool
    finished: bool


def choose_token(logits: torch.Tensor, config: SamplingConfig = SamplingConfig(), *,
                 generator: torch.Generator | None = None) -> int:
    """One token id from (V,) logits (−inf marks forbidden tokens).

    Greedy takes the first arg-max; sampling filters by ``top_k`` then ``top_p`` and draws
    one token with ``torch.multinomial`` (seeded by ``generator``).

    Examples:
        >>> import torch
        >>> logits = torch.tensor([0.0, 3.0, 1.0, float("-inf")])
        >>> choose_token(logits)
        1
        >>> g = torch.Generator().manual_seed(0)
        >>> choose_token(logits, SamplingConfig(do_sample=True, top_k=1), generator=g)
        1
    """
    if not config.do_sample:
        return int(logits.argmax())
    scores = logits.double() / config.temperature
    if config.top_k is not None and config.top_k < scores.numel():
        kth = scores.topk(config.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(-1)
        before = probs.cumsum(-1) - probs          # mass of the strictly more likely tokens
        drop = order[before >= config.top_p]
        scores = scores.index_fill(0, drop, float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs.to(logits.device), 1, generator=generator))


def beam_search(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                first_logprobs: torch.Tensor, *, num_beams: int, max_new_tokens: int,
                stop_ids: Collection[int], length_penalty: float = 1.0) -> list[int]:
    """Beam search with early stopping; returns the best hypothesis' tokens.

    Args:
        step: ``step(tokens (B,), parents (B,)) → (B, V)`` log-probabilities of the next
            token after appending ``tokens[i]`` to hypothesis ``parents[i]`` of the
            previous step (the caller reorders its caches by ``parents``).
        first_logprobs: (V,) log-probabilities of the first new token.
        num_beams: hypotheses kept per step (≥ 1; 1 is greedy).
        max_new_tokens: most tokens per hypothesis.
        stop_ids: tokens that finish a hypothesis (kept at its end).
        length_penalty: finished hypotheses are ranked by ``sum log p / len ** length_penalty``.

    Search stops once ``num_beams`` hypotheses have finished (``early_stopping=True`` in
    ``transformers``) or after ``max_new_tokens`` steps; hypotheses still open then are
    ranked with the finished ones.

    Examples:
        >>> import torch
        >>> table = torch.tensor([[0.1, 0.5, 0.4], [0.1, 0.2, 0.7], [0.95, 0.025, 0.025]]).log()
        >>> def step(tokens, parents):      # next-token distribution given the last token
        ...     return table[tokens]
        >>> beam_search(step, table[0], num_beams=1, max_new_tokens=3, stop_ids={0})
        [1, 2, 0]
        >>> beam_search(step, table[0], num_beams=2, max_new_tokens=3, stop_ids={0},
        ...             length_penalty=0.0)                  # 0.4·0.95 > 0.5·0.7·0.95
        [2, 0]
    """
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    stop_ids = set(stop_ids)
    finished: list[tuple[float, list[int]]] = []
    seqs, scores = [[]], torch.zeros(1, dtype=torch.float64)
    logp = first_logprobs.double()[None]
    vocab = logp.shape[-1]
    for t in range(max_new_tokens):
        cand = (scores[:, None] + logp.cpu()).view(-1)
        top = cand.topk(min(2 * num_beams, int(torch.isfinite(cand).sum())))
        new_seqs, new_scores, parents, tokens = [], [], [], []
        for rank, (score, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            parent, token = divmod(idx, vocab)
            seq = seqs[parent] + [token]
            if token in stop_ids or t == max_new_tokens - 1:
                if rank < num_beams:
                    finished.append((score / len(seq) ** length_penalty, seq))
                continue
            new_seqs.append(seq)
            new_scores.append(score)
            parents.append(parent)
            tokens.append(token)
            if len(new_seqs) == num_beams:
                break
        if len(finished) >= num_beams or not new_seqs or t == max_new_tokens - 1:
            break
        seqs, scores = new_seqs, torch.tensor(new_scores, dtype=torch.float64)
        logp = step(torch.tensor(tokens), torch.tensor(parents))
    if not finished:  # every candidate was -inf: nothing to choose
        raise ValueError("beam search found no finite-probability continuation")
    return max(finished, key=lambda f: f[0])[1]
