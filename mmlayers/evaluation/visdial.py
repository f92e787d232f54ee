"""VisDial metrics from a score matrix: NDCG (dense relevance) and retrieval ranks."""

from __future__ import annotations

import torch

__all__ = ["ndcg", "retrieval_ranks", "scores_to_ranks"]


def _scores(scores, name: str = "scores") -> torch.Tensor:
    t = torch.as_tensor(scores)
    if t.ndim != 2 or t.shape[1] == 0:
        raise ValueError(
            f"{name} must have shape (questions, options) with options > 0, got {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        t = t.double()
    return t


def scores_to_ranks(scores) -> torch.Tensor:
    """Rank of every option, 1 = highest score (ties keep the sort's order).

    Args:
        scores: (questions, options) option scores, higher is better (the official
            ``generate_scores`` mode scores an option by the sum of its tokens'
            log-probabilities).

    Returns:
        (questions, options) int64 ranks in 1..options.

    Raises:
        ValueError: if ``scores`` is not 2-D.

    Examples:
        >>> scores_to_ranks([[0.1, 0.9, 0.5]]).tolist()
        [[3, 1, 2]]
    """
    s = _scores(scores)
    order = s.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ar = torch.arange(1, s.shape[1] + 1).expand_as(order)
    return ranks.scatter_(1, order, ar)


def retrieval_ranks(scores, gt_index) -> dict[str, float]:
    """Sparse-ground-truth VisDial metrics: R@1/5/10, mean rank and MRR.

    Args:
        scores: (questions, options) option scores, higher is better.
        gt_index: (questions,) index (0-based) of the correct option of each question.

    Returns:
        ``{"r@1", "r@5", "r@10", "mean_rank", "mrr"}``, recalls and MRR in [0, 1].

    Raises:
        ValueError: if shapes disagree or an index is out of range.

    Examples:
        >>> m = retrieval_ranks([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]], [2, 0])
        >>> m["r@1"], m["mean_rank"], m["mrr"]
        (0.5, 1.5, 0.75)
    """
    ranks = scores_to_ranks(scores)
    gt = torch.as_tensor(gt_index, dtype=torch.long)
    if gt.shape != (ranks.shape[0],):
        raise ValueError(
            f"gt_index must have shape ({ranks.shape[0]},) to match scores, got {tuple(gt.shape)}"
        )
    if ((gt < 0) | (gt >= ranks.shape[1])).any():
        raise ValueError(f"gt_index values must be in [0, {ranks.shape[1]}), got {gt.tolist()}")
    r = ranks.gather(1, gt[:, None])[:, 0].double()
    return {
        "r@1": float((r <= 1).double().mean()),
        "r@5": float((r <= 5).double().mean()),
        "r@10": float((r <= 10).double().mean()),
        "mean_rank": float(r.mean()),
        "mrr": float(r.reciprocal().mean()),
    }


def ndcg(scores, relevance) -> float:
    """VisDial NDCG with dense relevance, as the official VisDial evaluation computes it.

    For each question with k = number of options of non-zero relevance, DCG@k of the
    options in predicted order (Σ_i rel_i / log2(i + 1), i = 1..k) is divided by DCG@k of
    the options sorted by relevance; the result is the mean over questions. Questions
    with no relevant option are rejected (the official code would divide 0 by 0).

    Args:
        scores: (questions, options) option scores, higher is better.
        relevance: (questions, options) dense relevance (VisDial's ``gt_relevance``).

    Returns:
        The mean NDCG in [0, 1].

    Raises:
        ValueError: if shapes disagree or a row has no relevant option.

    Examples:
        >>> ndcg([[0.9, 0.1, 0.5]], [[1.0, 0.0, 0.5]])
        1.0
        >>> round(ndcg([[0.1, 0.9, 0.5]], [[1.0, 0.0, 0.5]]), 4)
        0.2398
    """
    s = _scores(scores)
    rel = torch.as_tensor(relevance, dtype=torch.float64)
    if rel.shape != s.shape:
        raise ValueError(f"relevance must have the shape of scores {tuple(s.shape)}, got {tuple(rel.shape)}")
    k = (rel != 0).sum(dim=1)
    if (k == 0).any():
        rows = torch.nonzero(k == 0)[:, 0].tolist()
        raise ValueError(f"ndcg: rows {rows} have no option with non-zero relevance")
    order = scores_to_ranks(s).argsort(dim=1)  # option indices, best first
    best = rel.argsort(dim=1, descending=True, stable=True)
    discounts = torch.log2(torch.arange(s.shape[1], dtype=torch.float64) + 2)
    mask = torch.arange(s.shape[1])[None, :] < k[:, None]
    dcg = (rel.gather(1, order) / discounts * mask).sum(1)
    ideal = (rel.gather(1, best) / discounts * mask).sum(1)
    return float((dcg / ideal).mean())
