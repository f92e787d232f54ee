"""CIDEr-D, as the COCO caption evaluation (``pycocoevalcap``'s ``Cider``) computes it."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

from mmlayers.evaluation._captions import ngram_counts, prepare_captions

__all__ = ["cider_d"]


def _tfidf(counts: Counter, doc_freq: Counter, log_num_docs: float, n: int):
    """Per-order tf-idf vectors, their norms, and the "length" (number of bigrams)."""
    vecs: list[dict] = [{} for _ in range(n)]
    norms = [0.0] * n
    for gram, tf in counts.items():
        order = len(gram) - 1
        weight = float(tf) * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
        vecs[order][gram] = weight
        norms[order] += weight * weight
    # The reference measures length in bigrams; for two non-empty texts the difference
    # is the same as in words, and an empty text has no overlap to penalise.
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vecs, [math.sqrt(v) for v in norms], length


def cider_d(
    candidates: Mapping,
    references: Mapping,
    *,
    tokenize: bool = True,
    n: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D of candidate captions against reference captions.

    For each id and n-gram order k = 1..n, the candidate and each reference become tf-idf
    vectors g (idf = log(#ids) − log(max(1, df)), df = number of ids whose references
    contain the n-gram; the candidates do not count). The similarity to one reference is

        Σ_ngram min(g_cand, g_ref) · g_ref / (‖g_cand‖ ‖g_ref‖) · exp(−δ² / 2σ²)

    (the ``min`` is CIDEr-D's clipping; δ is the difference in length, measured as the
    reference code does in bigrams). Each id scores 10 × the mean over orders and
    references; the corpus score is the mean over ids. Equal to ``pycocoevalcap``'s
    ``Cider().compute_score`` on the same tokens.

    Args:
        candidates: id → one generated caption.
        references: id → list of reference captions; the same ids as ``candidates``.
        tokenize: apply [`ptb_tokenize`][mmlayers.evaluation.tokenize.ptb_tokenize] first (as
            ``COCOEvalCap`` does); ``False`` splits the texts on spaces as they are.
        n: largest n-gram order.
        sigma: width of the Gaussian length penalty.

    Returns:
        The corpus CIDEr-D (≥ 0, not bounded by 1; the COCO evaluation reports it ×100
        in papers, e.g. 1.04 → "104").

    Raises:
        TypeError: if the mappings or texts have the wrong types.
        ValueError: if the ids differ, a reference list is empty, or ``n < 1``.

    Examples:
        >>> refs = {1: ["a red circle", "a red round circle"], 2: ["a blue square"]}
        >>> round(cider_d({1: "a red circle", 2: "a green triangle"}, refs), 4)
        2.6299
        >>> round(cider_d({1: "a red circle", 2: "a blue square"}, refs), 4)
        6.3799
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"cider_d: n must be a positive int, got {n!r}")
    pairs = prepare_captions(candidates, references, tokenize=tokenize, metric="cider_d")
    ref_counts = [[ngram_counts(r, n) for r in refs] for _, refs in pairs]
    doc_freq: Counter = Counter()
    for counts in ref_counts:
        doc_freq.update({gram for c in counts for gram in c})
    log_num_docs = math.log(float(len(pairs)))

    total = 0.0
    for (cand, _), refs in zip(pairs, ref_counts, strict=True):
        vec, norm, length = _tfidf(ngram_counts(cand, n), doc_freq, log_num_docs, n)
        score = [0.0] * n
        for ref in refs:
            vec_r, norm_r, length_r = _tfidf(ref, doc_freq, log_num_docs, n)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0)
                          for g, w in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                score[k] += val * penalty
        total += sum(score) / n / len(refs) * 10.0
    return total / len(pairs)
