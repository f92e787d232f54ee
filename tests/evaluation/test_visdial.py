"""VisDial NDCG and retrieval ranks against a per-question loop written from the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from mmlayers.evaluation import ndcg, retrieval_ranks, scores_to_ranks


def _ndcg_loop(scores, relevance):
    total = 0.0
    for s, rel in zip(scores.tolist(), relevance.tolist(), strict=True):
        k = sum(r != 0 for r in rel)
        predicted = sorted(range(len(s)), key=lambda i: -s[i])[:k]
        ideal = sorted(rel, reverse=True)[:k]
        dcg = sum(rel[j] / math.log2(i + 2) for i, j in enumerate(predicted))
        best = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
        total += dcg / best
    return total / len(scores)


def test_ndcg_matches_loop_on_random_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(32, 100, generator=g, dtype=torch.float64)  # no ties
    relevance = (torch.rand(32, 100, generator=g) * 3).floor() / 2 * (torch.rand(32, 100, generator=g) < 0.1)
    relevance[:, 0] = 1.0  # every question has a relevant option
    assert ndcg(scores, relevance) == pytest.approx(_ndcg_loop(scores, relevance), rel=1e-12)
    assert ndcg(relevance + 1e-3 * scores.abs().clamp_max(1), relevance) > 0.99


def test_retrieval_ranks_hand_case():
    scores = [[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1], [0.0, 0.1, 0.2, 0.3]]
    assert scores_to_ranks(scores).tolist() == [[4, 1, 2, 3], [1, 2, 3, 4], [4, 3, 2, 1]]
    m = retrieval_ranks(scores, [2, 0, 0])  # ranks 2, 1, 4
    assert m["r@1"] == pytest.approx(1 / 3)
    assert m["r@5"] == 1.0 and m["r@10"] == 1.0
    assert m["mean_rank"] == pytest.approx(7 / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 4) / 3)


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        ndcg([[0.1, 0.2]], [[1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="no option"):
        ndcg([[0.1, 0.2]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="in \\[0, 2\\)"):
        retrieval_ranks([[0.1, 0.2]], [2])
    with pytest.raises(ValueError, match="questions, options"):
        scores_to_ranks([0.1, 0.2])
