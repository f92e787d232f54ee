"""Evaluation data: one JSON layout for every task, and converters from official files.

A task's directory holds ``annotations.json`` and the images it names (paths relative to
that directory)::

    <data-root>/<task>/annotations.json
    <data-root>/<task>/images/...

``annotations.json`` is ``{"task": "<task>", "items": [...]}`` with items by kind:

- caption: ``{"id", "image", "references": [str, ...]}``
- vqa: ``{"id", "image", "question", "answers": [str, ...]}`` (the 10 human answers)
- text_to_image: ``{"id", "caption"}`` plus optional ``"image"`` (the real image, for FID)
- visdial: ``{"id", "image", "caption", "dialog": [[q, a], ...], "round": r,
  "options": [str, ...], "relevance": [float, ...]}``

The converters turn the official annotation files (already loaded with ``json.load``)
into such items; they do no I/O themselves.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = [
    "LAYOUT",
    "coco_captions_items",
    "coco_t2i_items",
    "karpathy_items",
    "lncoco_items",
    "paragraph_items",
    "read_task_items",
    "visdial_items",
    "vizwiz_items",
    "vqa_items",
]

#: Required keys of an item, by task kind.
LAYOUT = {
    "caption": ("id", "image", "references"),
    "vqa": ("id", "image", "question", "answers"),
    "text_to_image": ("id", "caption"),
    "visdial": ("id", "image", "caption", "dialog", "round", "options", "relevance"),
}


def _layout_help(kind: str) -> str:
    keys = ", ".join(f'"{k}"' for k in LAYOUT[kind])
    return (f'expected {{"task": ..., "items": [{{{keys}}}, ...]}} in '
            "<data-root>/<task>/annotations.json (see docs/evaluation.md)")


def read_task_items(root: str | os.PathLike, task: str, kind: str) -> list[dict[str, Any]]:
    """Read and check ``<root>/<task>/annotations.json``.

    Args:
        root: the data root.
        task: the task name (its directory).
        kind: the task kind (``caption``, ``vqa``, ``text_to_image``, ``visdial``).

    Returns:
        The items, each with its ``"image"`` (if any) made an absolute path.

    Raises:
        FileNotFoundError: if the file or an image it names is missing (the message names
            it and the expected layout).
        ValueError: if the file is not valid JSON or an item lacks a key.
    """
    if kind not in LAYOUT:
        raise ValueError(f"kind must be one of {sorted(LAYOUT)}, got {kind!r}")
    folder = os.path.join(os.fspath(root), task)
    path = os.path.join(folder, "annotations.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; {_layout_help(kind)}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {_layout_help(kind)}") from e
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path} has no non-empty \"items\" list; {_layout_help(kind)}")
    ids = set()
    for i, item in enumerate(items):
        missing = [k for k in LAYOUT[kind] if not isinstance(item, dict) or k not in item]
        if missing:
            raise ValueError(f"{path}: item {i} lacks {missing}; {_layout_help(kind)}")
        if item["id"] in ids:
            raise ValueError(f"{path}: item {i} repeats id {item['id']!r}")
        ids.add(item["id"])
        if "image" in item:
            image = os.path.join(folder, item["image"])
            if not os.path.isfile(image):
                raise FileNotFoundError(f"{path}: item {i} names image {image}, which is missing")
            item["image"] = image
    return items


def karpathy_items(entries: list[dict]) -> list[dict]:
    """Caption items from a Karpathy-split file (``coco_karpathy_test.json``).

    Each entry is ``{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": [...]}``;
    the id is the number at the end of the file name and references are lower-cased, as
    the official loader does.

    Examples:
        >>> karpathy_items([{"image": "val2014/COCO_val2014_000000000042.jpg",
        ...                  "caption": ["A Dog."]}])
        [{'id': 42, 'image': 'val2014/COCO_val2014_000000000042.jpg', 'references': ['a dog.']}]
    """
    out = []
    for e in entries:
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        image_id = int(os.path.splitext(e["image"])[0].split("_")[-1])
        out.append({"id": image_id, "image": e["image"],
                    "references": [c.lower() for c in caps]})
    return out


def coco_captions_items(data: dict) -> list[dict]:
    """Caption items from a COCO-format file (``{"images": [...], "annotations": [...]}``):
    Flickr30k's ``test1k.token.coco_format``, NoCaps' ``nocaps_val_4500_captions.json``.

    Examples:
        >>> coco_captions_items({"images": [{"id": 1, "file_name": "a.jpg"}],
        ...     "annotations": [{"image_id": 1, "caption": "A cat"},
        ...                     {"image_id": 1, "caption": "a kitten"}]})
        [{'id': 1, 'image': 'a.jpg', 'references': ['a cat', 'a kitten']}]
    """
    files = {im["id"]: im["file_name"] for im in data["images"]}
    refs: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        refs.setdefault(ann["image_id"], []).append(ann["caption"].lower())
    return [{"id": i, "image": files[i], "references": r} for i, r in refs.items()]


def vqa_items(questions: dict, annotations: dict, *, image_format: str) -> list[dict]:
    """VQA items from the VQAv2 / OK-VQA / TextVQA question and annotation files.

    Args:
        questions: the loaded ``..._questions.json`` (``{"questions": [...]}``).
        annotations: the loaded ``..._annotations.json`` (``{"annotations": [...]}``).
        image_format: image path pattern, e.g. ``"val2014/COCO_val2014_{image_id:012d}.jpg"``
            (VQAv2, OK-VQA); TextVQA questions carry ``"image"``, used when present.

    Examples:
        >>> q = {"questions": [{"question_id": 7, "image_id": 3, "question": "Color?"}]}
        >>> a = {"annotations": [{"question_id": 7, "answers": [{"answer": "red"}] * 10}]}
        >>> vqa_items(q, a, image_format="{image_id}.jpg")[0]["image"]
        '3.jpg'
    """
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]]
               for a in annotations["annotations"]}
    out = []
    for q in questions["questions"]:
        image = q.get("image") or image_format.format(image_id=q["image_id"])
        out.append({"id": q["question_id"], "image": image, "question": q["question"],
                    "answers": answers[q["question_id"]]})
    return out


def vizwiz_items(entries: list[dict], *, folder: str = "val") -> list[dict]:
    """VQA items from the VizWiz ``val.json`` (a list of ``{"image", "question",
    "answers": [{"answer": ...}, ...]}``); the id is the number in the file name.

    Examples:
        >>> vizwiz_items([{"image": "VizWiz_val_00000007.jpg", "question": "What is it?",
        ...                "answers": [{"answer": "unanswerable"}] * 10}])[0]["id"]
        7
    """
    return [{"id": int(os.path.splitext(e["image"])[0].split("_")[-1]),
             "image": f"{folder}/{e['image']}", "question": e["question"],
             "answers": [a["answer"] for a in e["answers"]]} for e in entries]


def paragraph_items(paragraphs: dict, split_ids: list[int]) -> list[dict]:
    """Caption items from Image2Paragraph's ``paragraphs_coco.json`` and a split file
    (``test_split.json``, a list of image ids); the image path is the last two parts of
    the annotation's ``url`` and the paragraph is the single reference (not lower-cased).

    Examples:
        >>> paragraph_items({"annotations": [{"image_id": 3, "caption": "A cat. It sits.",
        ...     "url": "https://x/VG_100K/3.jpg"}]}, [3])[0]["image"]
        'VG_100K/3.jpg'
    """
    keep = set(split_ids)
    by_id = {a["image_id"]: a for a in paragraphs["annotations"]}
    return [{"id": i, "image": "/".join(a["url"].split("/")[-2:]), "references": [a["caption"]]}
            for i, a in by_id.items() if i in keep]


def coco_t2i_items(captions: dict, *, limit: int | None = 30_000,
                   image_format: str = "val2014/COCO_val2014_{image_id:012d}.jpg") -> list[dict]:
    """Text-to-image items from COCO's ``captions_val2014.json``: the first ``limit``
    captions in file order (the official 30K subset), lower-cased as the official loader
    does, each with its real image for FID.

    Examples:
        >>> coco_t2i_items({"annotations": [{"id": 9, "image_id": 4, "caption": "A Dog"}]})
        [{'id': 9, 'caption': 'a dog', 'image': 'val2014/COCO_val2014_000000000004.jpg'}]
    """
    anns = captions["annotations"][:limit]
    return [{"id": a["id"], "caption": a["caption"].lower(),
             "image": image_format.format(image_id=a["image_id"])} for a in anns]


def lncoco_items(lines: list[dict], *, limit: int | None = 30_000) -> list[dict]:
    """Text-to-image items from LN-COCO's ``coco_val_captions.jsonl`` (one JSON object
    per line, already parsed): the Localized Narratives caption and its COCO val2017
    image. Beyond the file's length the official loader resamples; this keeps the file.

    Examples:
        >>> item, = lncoco_items([{"image_id": "139", "caption": "We can see a TV."}])
        >>> item
        {'id': 0, 'caption': 'We can see a TV.', 'image': 'val2017/000000000139.jpg'}
    """
    return [{"id": i, "caption": e["caption"], "image": f"val2017/{int(e['image_id']):012d}.jpg"}
            for i, e in enumerate(lines[:limit])]


def visdial_items(data: dict, dense: list[dict]) -> list[dict]:
    """VisDial items from ``visdial_1.0_val.json`` and
    ``visdial_1.0_val_dense_annotations.json``: for each dialog with dense relevance, the
    asked ``round`` (1-based), its 100 options and their relevance.

    Examples:
        >>> data = {"data": {"questions": ["is it red", "where"], "answers": ["yes", "left"],
        ...     "dialogs": [{"image_id": 5, "caption": "a ball", "dialog": [
        ...         {"question": 0, "answer": 0, "answer_options": [0, 1]},
        ...         {"question": 1, "answer": 1, "answer_options": [1, 0]}]}]}}
        >>> dense = [{"image_id": 5, "round_id": 2, "gt_relevance": [1, 0]}]
        >>> item = visdial_items(data, dense)[0]
        >>> item["dialog"], item["options"], item["round"]
        ([['is it red', 'yes'], ['where', 'left']], ['left', 'yes'], 2)
    """
    d = data["data"]
    q, a = d["questions"], d["answers"]
    relevance = {x["image_id"]: x for x in dense}
    out = []
    for dialog in d["dialogs"]:
        rel = relevance.get(dialog["image_id"])
        if rel is None:
            continue
        rounds = dialog["dialog"]
        r = rel["round_id"]
        out.append({
            "id": dialog["image_id"],
            "image": f"VisualDialog_val2018/VisualDialog_val2018_{dialog['image_id']:012d}.jpg",
            "caption": dialog["caption"],
            "dialog": [[q[x["question"]], a[x["answer"]] if "answer" in x else ""]
                       for x in rounds],
            "round": r, "options": [a[i] for i in rounds[r - 1]["answer_options"]],
            "relevance": list(rel["gt_relevance"])})
    return out
