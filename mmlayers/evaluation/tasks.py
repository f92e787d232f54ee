"""The paper's zero-shot benchmarks: prompts, decoding settings and metrics per task.

Read from the official MM-Interleaved evaluation (``configs/release/mm_eval.yaml``, the
collators' defaults and ``MMInterleaved.generate_*``). Prompts are templates in which
``{image}`` stands for ``<soi><image>×k`` and ``{question}`` for the question; the
official code formats ``f"{system} {user} {assistant}".strip()``, which
[`render_prompt`][mmlayers.evaluation.tasks.render_prompt] reproduces as a list of text and image items.

Official quirks kept and documented here: the VQA answer extraction
([`extract_vqa_answer`][mmlayers.evaluation.tasks.extract_vqa_answer]) cuts at substrings such as ``"a "`` anywhere in the text,
and the VisDial context ([`visdial_prompt`][mmlayers.evaluation.tasks.visdial_prompt]) leaves out the round just before the
asked one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "IMAGE",
    "EvalTask",
    "TASKS",
    "TextGeneration",
    "ImageGeneration",
    "extract_vqa_answer",
    "get_task",
    "render_prompt",
    "visdial_prompt",
]

#: Marks where the image goes in a rendered prompt.
IMAGE = "{image}"


@dataclass(frozen=True)
class TextGeneration:
    """Text decoding settings (Hugging Face ``generate`` meanings).

    ``max_new_tokens`` is the official ``max_length`` (the official code passes it as
    ``max_new_tokens``); ``min_length`` is passed as ``min_length``.
    """

    max_new_tokens: int
    min_length: int
    num_beams: int
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    top_p: float = 0.9  # passed, but unused without sampling


@dataclass(frozen=True)
class ImageGeneration:
    """Image sampling settings; ``num_candidates > 1`` keeps the best by CLIP score."""

    guidance_scale: float
    num_inference_steps: int
    num_candidates: int = 1
    clip_rerank: bool = False


@dataclass(frozen=True)
class EvalTask:
    """One benchmark as the official evaluation runs it.

    Attributes:
        name: our task name (``recipes/evaluate.py --tasks``).
        kind: ``"caption"``, ``"vqa"``, ``"visdial"`` or ``"text_to_image"``.
        prompt: ``(assistant, user, system)`` templates, the official order.
        text: text decoding settings (captioning, VQA).
        image: image sampling settings (text-to-image).
        metrics: what the official evaluation reports.
        official_files: the annotation files the official code reads, relative to its
            annotation root.
        vqa_style: ``vqa_accuracy`` style (``"vqav2"`` or ``"vizwiz"``).
        max_items: the official subset size (30,000 captions for COCO text-to-image).
        notes: anything else the official evaluation does.
    """

    name: str
    kind: str
    prompt: tuple[str, str, str] = ("", "{image}", "")
    text: TextGeneration | None = None
    image: ImageGeneration | None = None
    metrics: tuple[str, ...] = ()
    official_files: tuple[str, ...] = ()
    vqa_style: str = "vqav2"
    max_items: int | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_CAPTION_PROMPT = ("a photo of", "{image}", "")
_CAPTION_TEXT = TextGeneration(max_new_tokens=20, min_length=8, num_beams=5)
_CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
_VQA_PROMPT = (
    "The answer is:",
    "Based on the image, please answer the question. {image}{question} "
    "Please provide an accurate answer within one word.",
    "",
)
_VQA_TEXT = TextGeneration(max_new_tokens=10, min_length=0, num_beams=3, length_penalty=0.0,
                           top_p=1.0)
_T2I_METRICS = ("FID",)

TASKS: dict[str, EvalTask] = {t.name: t for t in [
    EvalTask("coco_caption", "caption", _CAPTION_PROMPT, _CAPTION_TEXT, metrics=_CAPTION_METRICS,
             official_files=("annotations/coco_karpathy_test.json",
                             "annotations/coco_karpathy_test_gt.json"),
             notes="COCO Karpathy test split (5,000 images); references lower-cased."),
    EvalTask("flickr30k", "caption", _CAPTION_PROMPT, _CAPTION_TEXT, metrics=_CAPTION_METRICS,
             official_files=("test1k.token.coco_format",),
             notes="Flickr30k Karpathy test (1,000 images), COCO-format annotations."),
    EvalTask("nocaps", "caption", _CAPTION_PROMPT, _CAPTION_TEXT, metrics=_CAPTION_METRICS,
             official_files=("nocaps_val_4500_captions.json",),
             notes="NoCaps validation (4,500 images), COCO-format annotations."),
    EvalTask("image2paragraph", "caption",
             ("The image depicts", "{image}Please describe the image in detail.", ""),
             TextGeneration(max_new_tokens=90, min_length=90, num_beams=5,
                            repetition_penalty=1.2),
             metrics=_CAPTION_METRICS,
             official_files=("annotations/paragraphs_coco.json", "annotations/test_split.json"),
             notes="Stanford Image-Paragraph test split; paragraphs are not lower-cased."),
    EvalTask("vqav2", "vqa", _VQA_PROMPT, _VQA_TEXT, metrics=("VQA accuracy",),
             official_files=("v2_OpenEnded_mscoco_val2014_questions.json",
                             "v2_mscoco_val2014_annotations.json")),
    EvalTask("okvqa", "vqa", _VQA_PROMPT, _VQA_TEXT, metrics=("VQA accuracy",),
             official_files=("OpenEnded_mscoco_val2014_questions.json",
                             "mscoco_val2014_annotations.json")),
    EvalTask("vizwiz", "vqa",
             ("The answer is:",
              "Based on the image, please answer the question. {image}{question} When the "
              "provided information is insufficient, respond with 'Unanswerable'. Please "
              "provide an accurate answer within one word.", ""),
             _VQA_TEXT, metrics=("VQA accuracy",), official_files=("val.json",),
             vqa_style="vizwiz"),
    EvalTask("textvqa", "vqa", _VQA_PROMPT, _VQA_TEXT, metrics=("VQA accuracy",),
             official_files=("textvqa_val_questions.json", "textvqa_val_annotations.json"),
             notes="No OCR tokens are given to the model."),
    EvalTask("visdial", "visdial", metrics=("NDCG",),
             official_files=("visdial_1.0_val.json", "visdial_1.0_val_dense_annotations.json"),
             notes="Each of the 100 options is scored by the sum of its tokens' "
                   "log-probabilities after the context (visdial_prompt); only the round "
                   "with dense relevance is evaluated."),
    EvalTask("coco_t2i", "text_to_image", ("", "", ""),
             image=ImageGeneration(guidance_scale=3.5, num_inference_steps=250,
                                   num_candidates=8, clip_rerank=True),
             metrics=_T2I_METRICS, official_files=("annotations/captions_val2014.json",),
             max_items=30_000,
             notes="30,000 captions of COCO val2014; FID against the real images."),
    EvalTask("lncoco", "text_to_image", ("", "", ""),
             image=ImageGeneration(guidance_scale=3.5, num_inference_steps=250),
             metrics=_T2I_METRICS, official_files=("coco_val_captions.jsonl",),
             max_items=30_000,
             notes="Localized Narratives captions of COCO val2017 images."),
]}


def get_task(name: str) -> EvalTask:
    """The task called ``name``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).

    Examples:
        >>> get_task("vqav2").text.num_beams
        3
    """
    if name not in TASKS:
        raise ValueError(f"unknown evaluation task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def render_prompt(task: EvalTask, *, question: str | None = None,
                  caption: str | None = None) -> list[str]:
    """The task's prompt as text pieces with [`IMAGE`][mmlayers.evaluation.tasks.IMAGE] where the image goes.

    Args:
        task: the task.
        question: the question (VQA tasks).
        caption: the caption to draw (text-to-image tasks).

    Returns:
        Text pieces and [`IMAGE`][mmlayers.evaluation.tasks.IMAGE] markers, empty pieces dropped, each piece stripped
        of surrounding spaces (the official text joins them with one space).

    Raises:
        ValueError: if a VQA task gets no question or a text-to-image task no caption.

    Examples:
        >>> render_prompt(get_task("coco_caption"))
        ['{image}', 'a photo of']
        >>> render_prompt(get_task("vqav2"), question="What colour is it?")[:2]
        ['Based on the image, please answer the question.', '{image}']
    """
    if task.kind == "text_to_image":
        if caption is None:
            raise ValueError(f"task {task.name!r} needs caption=")
        return [caption.strip(), IMAGE]
    if task.kind == "vqa" and question is None:
        raise ValueError(f"task {task.name!r} needs question=")
    assistant, user, system = task.prompt
    if IMAGE not in user:
        user = IMAGE + user
    if question is not None:
        user = user.replace("{question}", question)
    before, after = user.split(IMAGE, 1)
    pieces = [f"{system} {before}".strip(), IMAGE, f"{after} {assistant}".strip()]
    return [p for p in pieces if p]


def visdial_prompt(caption: str, dialog: list[tuple[str, str]], round_index: int,
                   *, official: bool = True) -> tuple[str, str]:
    """Text after the image for VisDial round ``round_index`` (1-based) and its question.

    The context is ``"caption: {caption}. "`` + ``"question: {q}? answer: {a}. "`` per
    history round + ``"question: {q}? answer:"``. With ``official=True`` the history is
    rounds ``1 .. round_index − 2``, as the official code builds it (the round just
    before the asked one is left out); ``official=False`` keeps all earlier rounds.

    Args:
        caption: the image caption.
        dialog: ``(question, answer)`` per round, in order.
        round_index: the asked round, 1-based (VisDial's ``round_id``).
        official: reproduce the official history.

    Returns:
        ``(context, question)``.

    Raises:
        ValueError: if ``round_index`` is outside ``1 .. len(dialog)``.

    Examples:
        >>> d = [("is it red", "yes"), ("is it big", "no"), ("where is it", "left")]
        >>> visdial_prompt("a circle", d, 3)[0]
        'caption: a circle. question: is it red? answer: yes. question: where is it? answer:'
    """
    if not 1 <= round_index <= len(dialog):
        raise ValueError(f"round_index must be in 1..{len(dialog)}, got {round_index}")
    last = round_index - 2 if official else round_index - 1
    text = f"caption: {caption}. "
    for q, a in dialog[: max(last, 0)]:
        text += f"question: {q}? answer: {a}. "
    question = dialog[round_index - 1][0]
    return text + f"question: {question}? answer:", question


def extract_vqa_answer(text: str) -> str:
    """The official post-processing of a generated VQA answer, quirks included.

    Double quotes are removed; the text is stripped, cut at the first newline, ``.``,
    ``,`` and ``!``, and lower-cased; then, in this order, the text after the first
    ``"is "``, ``"are "``, ``"a "``, ``"an "``, ``"the "`` and before the next one is kept
    (each tested as a substring anywhere, so ``"banana split"`` → ``"split"`` and
    ``"a banana split"`` → ``"banan"``), the text before the first
    ``" of"``, ``" or "``, ``" and "`` is kept, and the result is stripped.

    Args:
        text: the generated answer.

    Returns:
        The answer passed to [`vqa_accuracy`][mmlayers.evaluation.vqa.vqa_accuracy].

    Examples:
        >>> extract_vqa_answer("The answer is a red circle. It is big")
        'red circle'
        >>> extract_vqa_answer("Yes, it is")
        'yes'
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_vqa_answer expects a str, got {type(text).__name__}")
    s = text.replace('"', "").strip()
    for sep in ("\n", ".", ",", "!"):
        s = s.split(sep)[0]
    s = s.lower()
    for marker in ("is ", "are ", "a ", "an ", "the "):
        if marker in s:
            s = s.split(marker)[1]
    for marker in (" of", " or ", " and "):
        if marker in s:
            s = s.split(marker)[0]
    return s.strip()
