"""Evaluation metrics and benchmark task definitions (no I/O in the metrics).

Caption metrics follow the COCO caption evaluation, VQA accuracy the official VQA
evaluation, NDCG and ranks the VisDial evaluation, and the Fréchet distance the FID
reference; ``docs/evaluation.md`` lists what each was checked against. Nothing here is
imported by ``import mmlayers``; the metrics need only the standard library and torch.
"""

from mmlayers.evaluation.bleu import bleu
from mmlayers.evaluation.cider import cider_d
from mmlayers.evaluation.frechet import frechet_distance
from mmlayers.evaluation.tokenize import PTB_PUNCTUATION, ptb_tokenize
from mmlayers.evaluation.visdial import ndcg, retrieval_ranks, scores_to_ranks
from mmlayers.evaluation.vqa import normalize_vqa_answer, vqa_accuracy

__all__ = [
    "PTB_PUNCTUATION",
    "bleu",
    "cider_d",
    "frechet_distance",
    "ndcg",
    "normalize_vqa_answer",
    "ptb_tokenize",
    "retrieval_ranks",
    "scores_to_ranks",
    "vqa_accuracy",
]
