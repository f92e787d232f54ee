"""Input checks and n-gram counting shared by the caption metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from mmlayers.evaluation.tokenize import ptb_tokenize

__all__ = ["ngram_counts", "prepare_captions"]


def prepare_captions(
    candidates: Mapping, references: Mapping, *, tokenize: bool, metric: str
) -> list[tuple[list[str], list[list[str]]]]:
    """Check the inputs and return ``(candidate words, [reference words, ...])`` per id.

    The ids are taken in ``candidates``' order; both mappings must have the same ids,
    every candidate must be one string and every reference entry a non-empty list of
    strings (the COCO evaluation's own preconditions).
    """
    if not isinstance(candidates, Mapping) or not isinstance(references, Mapping):
        raise TypeError(
            f"{metric} expects candidates: dict id -> str and references: dict id -> list "
            f"of str, got {type(candidates).__name__} and {type(references).__name__}"
        )
    if not candidates:
        raise ValueError(f"{metric} needs at least one candidate, got an empty dict")
    if set(candidates) != set(references):
        missing = sorted(map(str, set(candidates) ^ set(references)))[:5]
        raise ValueError(
            f"{metric}: candidates and references must have the same ids; these ids are in "
            f"only one of them: {missing}"
        )

    def words(text, where):
        if not isinstance(text, str):
            raise TypeError(f"{metric}: {where} must be a str, got {type(text).__name__}")
        return (ptb_tokenize(text) if tokenize else text).split()

    out = []
    for key, cand in candidates.items():
        refs = references[key]
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)) or not refs:
            raise ValueError(
                f"{metric}: references[{key!r}] must be a non-empty list of str, got {refs!r}"
            )
        out.append(
            (
                words(cand, f"candidates[{key!r}]"),
                [words(r, f"references[{key!r}]") for r in refs],
            )
        )
    return out


def ngram_counts(words: list[str], n: int) -> Counter:
    """Counts of every 1- to n-gram of ``words``, keyed by word tuples."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts
