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

__all__ = ["OFFICIAL_SAMPLING", "SamplingConfig", "TextResult", "beam_search", "choose_token",
           "penalize_repetition"]


@dataclass(frozen=True)
class SamplingConfig:
    """How [`choose_token`][mmlayers.models.decoding.choose_token] picks a token.

    Attributes:
        do_sample: draw from the (filtered) distribution; ``False``: greedy arg-max.
        temperature: logits are divided by it before sampling (> 0).
        top_k: keep the k most likely tokens (``None``: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches
            ``top_p`` (nucleus sampling; ``None`` or 1: all).
        repetition_penalty: CTRL's penalty on tokens already generated in this text turn
            ([`penalize_repetition`][mmlayers.models.decoding.penalize_repetition]); 1: none.
            Applies to greedy decoding too.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if isinstance(self.repetition_penalty, bool) or not isinstance(
                self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be a number > 0, got "
                             f"{self.repetition_penalty!r}")


#: The official MM-Interleaved text decoding (``mm_inference.yaml``): nucleus sampling with
#: top-p 0.9, repetition penalty 1.3, temperature 1; at most 90 and at least 8 new tokens
#: per text turn (``max_new_tokens`` / ``min_new_tokens`` of the caller).
OFFICIAL_SAMPLING = SamplingConfig(do_sample=True, top_p=0.9, repetition_penalty=1.3)


def penalize_repetition(logits: torch.Tensor, previous, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), as ``transformers`` applies it.

    For every id in ``previous`` (each once): a positive logit is divided by ``penalty``,
    a negative one multiplied by it; ``-inf`` stays ``-inf``.

    Args:
        logits: (V,) logits.
        previous: token ids already generated (any iterable of ints or a tensor).
        penalty: > 0 (> 1 discourages repeats).

    Returns:
        a new (V,) tensor.

    Examples:
        >>> import torch
        >>> penalize_repetition(torch.tensor([2.0, -1.0, 0.5]), [0, 1, 1], 2.0).tolist()
        [1.0, -2.0, 0.5]
    """
    ids = torch.as_tensor(list(previous) if not isinstance(previous, torch.Tensor) else previous,
                          dtype=torch.long, device=logits.device).unique()
    if ids.numel() == 0:
        return logits.clone()
    picked = logits[ids]
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.index_copy(0, ids, picked)


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
                 generator: torch.Generator | None = None, previous=None) -> int:
    """One token id from (V,) logits (−inf marks forbidden tokens).

    With ``config.repetition_penalty`` ≠ 1 the logits of the ``previous`` ids (the tokens
    generated so far in this turn) are penalised first. Greedy takes the first arg-max;
    sampling filters by ``top_k`` then ``top_p`` and draws one token with
    ``torch.multinomial`` (seeded by ``generator``).

    Examples:
        >>> import torch
        >>> logits = torch.tensor([0.0, 3.0, 1.0, float("-inf")])
        >>> choose_token(logits)
        1
        >>> g = torch.Generator().manual_seed(0)
        >>> choose_token(logits, SamplingConfig(do_sample=True, top_k=1), generator=g)
        1
    """
    if config.repetition_penalty != 1 and previous is not None:
        logits = penalize_repetition(logits, previous, config.repetition_penalty)
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
