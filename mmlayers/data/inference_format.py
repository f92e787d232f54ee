"""Generation requests from JSON: the official MM-Interleaved inference format and ours.

Shape key: c channels · H height · W width.

**Official format** (``docs/examples/annt.json`` of the reference code), a list of::

    {"sentences": ["a kitchen ...", ...], "images": ["path.jpg", ...],
     "sentence_ixs": [0, ...], "image_first": [false, ...],
     "generate_mode": "generate_images" | "generate_texts", "num_iter": 1}

Image ``i`` goes right before (``image_first[i]``) or after sentence ``sentence_ixs[i]``.
Images attached to the same side of one sentence keep their order (the reference code
prepends them one by one, which reverses their text order against the image order).

With **official semantics** (``"official_semantics": true`` in a record, or
``official=True`` for every official-format record) a request runs as the reference
inference loop does: ``generate_images`` regenerates the *last listed image* from what
precedes it (``target_index`` says which item it replaces; the items after it follow the
new image), text turns may open an image (the next turn draws it), and every input image
is center-cropped to a square (the official transform resizes the shorter side and crops
the centre); a record without ``num_iter`` runs 2 iterations (the official default).

**Our format**, a list (or one object) of::

    {"items": ["text", {"image": "path.png"}, "more text"],
     "generate": "text" | "image" | "interleaved", "turns": 1,
     "max_new_tokens": 32, "num_inference_steps": 30, "guidance_scale": 7.5, "seed": 0}

Image paths are relative to the JSON file (or ``image_root``). Every image is read while
the file is parsed, so a request with an unreadable image fails before anything is
generated or written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmlayers.data.images import read_image

__all__ = ["GENERATE_MODES", "GenerationRequest", "read_generation_requests"]

#: ``generate`` values of our format, and what the official ``generate_mode`` maps to.
GENERATE_MODES = ("text", "image", "interleaved")
_OFFICIAL_MODES = {"generate_texts": "text", "generate_images": "image",
                   "generate_interleaved": "interleaved"}
_OPTIONS = ("max_new_tokens", "num_inference_steps", "guidance_scale", "seed")


@dataclass
class GenerationRequest:
    """One document to continue.

    Attributes:
        items: text (``str``) and images (float (c, H, W) in [0, 1]) in document order.
        generate: ``"text"``, ``"image"`` or ``"interleaved"``.
        turns: how many times to generate (official ``num_iter``).
        options: per-request overrides (``max_new_tokens``, ``num_inference_steps``,
            ``guidance_scale``, ``seed``).
        image_paths: the file of each image item, in order.
        source: the record as read.
        official: run with the official semantics (module docstring).
        target_index: with official semantics and ``generate == "image"``: the index in
            ``items`` of the image to regenerate (the last one); ``None`` otherwise.
    """

    items: list[Any]
    generate: str
    turns: int = 1
    options: dict = field(default_factory=dict)
    image_paths: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    official: bool = False
    target_index: int | None = None


def center_crop_square(image: torch.Tensor) -> torch.Tensor:
    """The central ``s × s`` square of a (c, H, W) image, ``s = min(H, W)``.

    Examples:
        >>> import torch
        >>> center_crop_square(torch.arange(6.0).view(1, 2, 3)).tolist()
        [[[0.0, 1.0], [3.0, 4.0]]]
    """
    h, w = image.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[..., top:top + s, left:left + s]


def _fail(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


def _load(path: str, root: Path, where: str) -> tuple[torch.Tensor, str]:
    if not isinstance(path, str) or not path:
        raise _fail(where, f"an image path must be a non-empty string, got {path!r}")
    full = Path(path) if os.path.isabs(path) else root / path
    try:
        return read_image(full), str(full)
    except ValueError as e:
        raise _fail(where, str(e)) from None


def _int(value: Any, where: str, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(where, f"{name} must be an int >= {low}, got {value!r}")
    return value


def _official(rec: dict, root: Path, where: str, official: bool = False) -> GenerationRequest:
    sentences, paths = rec.get("sentences"), rec.get("images", [])
    official = rec.get("official_semantics", official)
    if not isinstance(official, bool):
        raise _fail(where, f"official_semantics must be true or false, got {official!r}")
    ixs, first = rec.get("sentence_ixs", []), rec.get("image_first", [])
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise _fail(where, "'sentences' must be a list of strings")
    if not (isinstance(paths, list) and isinstance(ixs, list) and isinstance(first, list)) \
            or not len(paths) == len(ixs) == len(first):
        raise _fail(where, f"'images', 'sentence_ixs' and 'image_first' must be lists of one "
                           f"length, got {len(paths)}, {len(ixs)}, {len(first)}")
    for i, ix in enumerate(ixs):
        if isinstance(ix, bool) or not isinstance(ix, int) or not 0 <= ix < len(sentences):
            raise _fail(where, f"sentence_ixs[{i}] = {ix!r} is not a sentence index "
                               f"(0 … {len(sentences) - 1})")
    mode = rec.get("generate_mode", "generate_texts")
    if mode not in _OFFICIAL_MODES:
        raise _fail(where, f"generate_mode must be one of {sorted(_OFFICIAL_MODES)}, got {mode!r}")
    loaded = [_load(p, root, f"{where}, images[{i}]") for i, p in enumerate(paths)]
    items, used = [], []
    for j, sentence in enumerate(sentences):
        before = [i for i in range(len(paths)) if ixs[i] == j and first[i]]
        after = [i for i in range(len(paths)) if ixs[i] == j and not first[i]]
        items += [loaded[i][0] for i in before] + ([sentence] if sentence.strip() else []) \
            + [loaded[i][0] for i in after]
        used += before + after
    if not items:
        raise _fail(where, "the document is empty (no sentences and no images)")
    target = None
    if official:
        items = [center_crop_square(x) if isinstance(x, torch.Tensor) else x for x in items]
        if mode == "generate_images":
            images = [i for i, x in enumerate(items) if isinstance(x, torch.Tensor)]
            if not images:
                raise _fail(where, "generate_images with official semantics regenerates the "
                                   "last listed image, but the request lists none")
            target = images[-1]
    # the official inference config runs 2 iterations when a record does not say
    turns = rec.get("num_iter", 2 if official else 1)
    return GenerationRequest(items, _OFFICIAL_MODES[mode], _int(turns, where, "num_iter"),
                             {}, [loaded[i][1] for i in used], rec, official, target)


def _ours(rec: dict, root: Path, where: str) -> GenerationRequest:
    raw = rec.get("items")
    if not isinstance(raw, list) or not raw:
        raise _fail(where, "'items' must be a non-empty list of text and {'image': path}")
    items, paths = [], []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item.strip():
            items.append(item)
        elif isinstance(item, dict) and set(item) == {"image"}:
            image, full = _load(item["image"], root, f"{where}, items[{i}]")
            items.append(image)
            paths.append(full)
        else:
            raise _fail(where, f"items[{i}] must be non-empty text or {{'image': path}}, got "
                               f"{item!r}")
    generate = rec.get("generate", "text")
    if generate not in GENERATE_MODES:
        raise _fail(where, f"generate must be one of {GENERATE_MODES}, got {generate!r}")
    unknown = set(rec) - {"items", "generate", "turns", *_OPTIONS}
    if unknown:
        raise _fail(where, f"unknown keys {sorted(unknown)}; expected items, generate, turns, "
                           f"{', '.join(_OPTIONS)}")
    options = {k: rec[k] for k in _OPTIONS if k in rec}
    for k in ("max_new_tokens", "num_inference_steps"):
        if k in options:
            _int(options[k], where, k)
    if "seed" in options:
        _int(options["seed"], where, "seed", low=0)
    if "guidance_scale" in options and not isinstance(options["guidance_scale"], (int, float)):
        raise _fail(where, f"guidance_scale must be a number, got {options['guidance_scale']!r}")
    return GenerationRequest(items, generate, _int(rec.get("turns", 1), where, "turns"),
                             options, paths, rec)


def read_generation_requests(path: str | os.PathLike, *,
                             image_root: str | os.PathLike | None = None,
                             official: bool = False) -> list[GenerationRequest]:
    """Parse a JSON file of generation requests in either format (told apart per record:
    ``sentences`` → official, ``items`` → ours) and read every image.

    Args:
        path: the JSON file: a list of records, or one record.
        image_root: directory relative image paths start from; default the file's.
        official: official semantics for every official-format record without an
            ``official_semantics`` key (module docstring).

    Raises:
        ValueError: missing or malformed file, a record in neither format, bad fields,
            unreadable images, an empty list; the message names the record (``record 3``)
            and what was expected.

    Examples:
        >>> import json, os, tempfile, torch
        >>> from mmlayers.data.images import to_pil
        >>> root = tempfile.mkdtemp()
        >>> to_pil(torch.zeros(3, 8, 8)).save(os.path.join(root, "a.png"))
        >>> official = {"sentences": ["a black square.", "now in red."], "images": ["a.png"],
        ...             "sentence_ixs": [0], "image_first": [False],
        ...             "generate_mode": "generate_images", "num_iter": 1}
        >>> ours = {"items": [{"image": "a.png"}, "describe it:"], "generate": "text"}
        >>> with open(os.path.join(root, "in.json"), "w") as f:
        ...     json.dump([official, ours], f)
        >>> a, b = read_generation_requests(os.path.join(root, "in.json"))
        >>> [type(x).__name__ for x in a.items], a.generate, b.generate
        (['str', 'Tensor', 'str'], 'image', 'text')
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"no such request file: {str(path)!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot parse {str(path)!r} as JSON: {e}") from None
    records = [data] if isinstance(data, dict) else data
    if not isinstance(records, list) or not records:
        raise ValueError(f"{str(path)!r} must hold a non-empty list of requests (or one object)")
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for i, rec in enumerate(records):
        where = f"{path.name}, record {i}"
        if not isinstance(rec, dict):
            raise _fail(where, f"a request must be a JSON object, got {type(rec).__name__}")
        if "sentences" in rec:
            out.append(_official(rec, root, where, official))
        elif "items" in rec:
            out.append(_ours(rec, root, where))
        else:
            raise _fail(where, "neither format: expected 'sentences' (official) or 'items'")
    return out
