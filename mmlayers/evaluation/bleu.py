"""Corpus BLEU, as the COCO caption evaluation (``pycocoevalcap``'s ``Bleu``) computes it."""

from __future__ import annotations

import math
from collections.abc import Mapping

from mmlayers.evaluation._captions import ngram_counts, prepare_captions

__all__ = ["bleu"]

_TINY = 1e-15  # the reference's guards: 0 matches still give 0, 0 guesses no division
_SMALL = 1e-9


def bleu(candidates: Mapping, references: Mapping, *, n: int = 4, tokenize: bool = True) -> float:
    """Corpus BLEU-n with the COCO caption evaluation's rules.

    Matches are clipped by the largest count of the n-gram in any one reference and
    summed over the corpus; the reference length of each candidate is the "closest"
    one (ties go to the shorter); then

        BLEU-n = (Π_{k≤n} (matches_k + 1e-15) / (guesses_k + 1e-9))^(1/n) · BP,
        BP = exp(1 − r/c) if c < r else 1,

    with c and r the corpus candidate and reference lengths (``(c + 1e-15) /
    (r + 1e-9)`` in the ratio, as the reference does). Equal to element ``n − 1`` of
    ``pycocoevalcap``'s ``Bleu(n).compute_score`` on the same tokens.

    Args:
        candidates: id → one generated caption.
        references: id → list of reference captions; the same ids as ``candidates``.
        n: largest n-gram order (4 gives BLEU-4).
        tokenize: apply [`ptb_tokenize`][mmlayers.evaluation.tokenize.ptb_tokenize] first (as
            ``COCOEvalCap`` does); ``False`` splits the texts on spaces as they are.

    Returns:
        BLEU-n in [0, 1].

    Raises:
        TypeError: if the mappings or texts have the wrong types.
        ValueError: if the ids differ, a reference list is empty, or ``n < 1``.

    Examples:
        >>> refs = {1: ["a red circle on the left"], 2: ["a blue square at the top"]}
        >>> round(bleu({1: "a red circle on the left", 2: "a blue square at the top"}, refs), 6)
        1.0
        >>> round(bleu({1: "a red circle on the right", 2: "a blue square"}, refs, n=2), 4)
        0.6254
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"bleu: n must be a positive int, got {n!r}")
    pairs = prepare_captions(candidates, references, tokenize=tokenize, metric="bleu")
    test_len = ref_len = 0
    guess = [0] * n
    correct = [0] * n
    for cand, refs in pairs:
        max_counts: dict = {}
        for ref in refs:
            for gram, count in ngram_counts(ref, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), count)
        c = len(cand)
        test_len += c
        ref_len += min((abs(len(r) - c), len(r)) for r in refs)[1]
        for k in range(n):
            guess[k] += max(0, c - k)
        for gram, count in ngram_counts(cand, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
    score = 1.0
    for k in range(n):
        score *= (correct[k] + _TINY) / (guess[k] + _SMALL)
    score **= 1.0 / n
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return score
