"""Evaluation metrics and benchmark task definitions (no I/O in the metrics).

Caption metrics follow the COCO caption evaluation, VQA accuracy the official VQA
evaluation, NDCG and ranks the VisDial evaluation, and the Fréchet distance the FID
reference; ``docs/evaluation.md`` lists what each was checked against. ``TASKS`` holds
the paper's benchmarks with the official prompts and decoding settings, and
``read_task_items`` reads a task's data in the layout the docs describe. Nothing here is
imported by ``import mmlayers``; the metrics need only the standard library and torch.
"""

from mmlayers.evaluation.bleu import bleu
from mmlayers.evaluation.cider import cider_d
from mmlayers.evaluation.clip_similarity import clip_similarity
from mmlayers.evaluation.frechet import feature_statistics, frechet_distance
from mmlayers.evaluation.option_scores import option_log_likelihoods
from mmlayers.evaluation.readers import (
    LAYOUT,
    coco_captions_items,
    coco_t2i_items,
    karpathy_items,
    lncoco_items,
    paragraph_items,
    read_task_items,
    visdial_items,
    vizwiz_items,
    vqa_items,
)
from mmlayers.evaluation.tasks import (
    IMAGE,
    TASKS,
    EvalTask,
    ImageGeneration,
    TextGeneration,
    extract_vqa_answer,
    get_task,
    render_prompt,
    visdial_prompt,
)
from mmlayers.evaluation.tokenize import PTB_PUNCTUATION, ptb_tokenize
from mmlayers.evaluation.visdial import ndcg, retrieval_ranks, scores_to_ranks
from mmlayers.evaluation.vqa import normalize_vqa_answer, vqa_accuracy

__all__ = [
    "IMAGE",
    "LAYOUT",
    "PTB_PUNCTUATION",
    "TASKS",
    "EvalTask",
    "ImageGeneration",
    "TextGeneration",
    "bleu",
    "cider_d",
    "clip_similarity",
    "coco_captions_items",
    "coco_t2i_items",
    "extract_vqa_answer",
    "feature_statistics",
    "frechet_distance",
    "get_task",
    "karpathy_items",
    "lncoco_items",
    "ndcg",
    "normalize_vqa_answer",
    "option_log_likelihoods",
    "paragraph_items",
    "ptb_tokenize",
    "read_task_items",
    "render_prompt",
    "retrieval_ranks",
    "scores_to_ranks",
    "visdial_items",
    "visdial_prompt",
    "vizwiz_items",
    "vqa_accuracy",
    "vqa_items",
]
