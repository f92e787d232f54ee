"""Shapes evaluation (captions, text→image, colour edits) and the demo's HTML page.

Recipes only: the rules that decide what a generated image shows are
:func:`mmlayers.data.score_image` / :func:`describe_image` (pixels, no model).
"""

from __future__ import annotations

import base64
import html
import io
import sys
from collections.abc import Iterable

import torch

from mmlayers.data import ShapesCorpus, caption_matches, describe_image, score_image

__all__ = ["caption_accuracy", "color_edit_docs", "evaluate_captions", "evaluate_edits",
           "evaluate_text_to_image", "png_data_uri", "score_generated", "write_page"]


def _images_with_attrs(corpus: ShapesCorpus, indices: Iterable[int]):
    for i in indices:
        doc = corpus[i]
        for img, attrs in zip(doc.images, doc.meta["images"], strict=True):
            yield img, list(attrs)


def _bar(total: int, desc: str):
    """A tqdm bar (rate, ETA) on an interactive terminal; silent otherwise."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def evaluate_captions(model, corpus: ShapesCorpus, indices: Iterable[int], *,
                      batch: int = 32, desc: str = "captions") -> tuple[dict, list[dict]]:
    """Greedy captions of every image of the documents → (scores, rows).

    Scores: ``exact`` (every shape's colour, shape, size and position named correctly) and
    ``color_shape`` (the colour + shape multiset only, a partial score)."""
    pairs = list(_images_with_attrs(corpus, indices))
    rows = []
    with _bar(len(pairs), desc) as bar:
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            texts = model.caption(torch.stack([p[0] for p in chunk]))
            for (img, attrs), text in zip(chunk, texts, strict=True):
                rows.append({"image": img, "caption": text,
                             "truth": " and ".join(a.phrase() for a in attrs) + ".",
                             "match": caption_matches(text, attrs, position=True, size=True),
                             "color_shape": caption_matches(text, attrs)})
            bar.update(len(chunk))
    return {"exact": _mean(rows, "match"), "color_shape": _mean(rows, "color_shape"),
            "n": len(rows)}, rows


def caption_accuracy(model, corpus: ShapesCorpus, indices: Iterable[int]) -> float:
    """Exact caption match (colour, shape, size and position) over the documents' images."""
    return evaluate_captions(model, corpus, indices, desc="eval captions")[0]["exact"]


def score_generated(img, attrs, palette) -> dict:
    """Pixel scores of a generated image against the first asked shape."""
    s = score_image(img, attrs, colors=palette)
    found = describe_image(img, colors=palette)
    want = attrs[0]
    return {"color": s.color, "shape": s.shape, "position": s.position, "exact": s.exact,
            "color_present": any(f.color == want.color for f in found),
            "shape_present": any(f.shape == want.shape for f in found), "found": found}


def _mean(rows: list[dict], key: str) -> float:
    return sum(float(r[key]) for r in rows) / max(1, len(rows))


def evaluate_text_to_image(model, corpus: ShapesCorpus, indices: Iterable[int], *,
                           seed: int = 0, batch: int = 16) -> tuple[dict, list[dict]]:
    """Generate the image of each ``caption_image`` document from its caption; score it."""
    docs = [corpus[i] for i in indices]
    docs = [d for d in docs if d.meta["kind"] == "caption_image"]
    rows, gen = [], torch.Generator().manual_seed(seed)
    with _bar(len(docs), "text → image") as bar:
        for start in range(0, len(docs), batch):
            chunk = docs[start:start + batch]
            images = model.generate_images([[d.items[0]] for d in chunk], generator=gen)
            for d, img in zip(chunk, images, strict=True):
                attrs = list(d.meta["images"][0])
                rows.append({"prompt": d.items[0], "image": img, "reference": d.images[0],
                             **score_generated(img, attrs, corpus.colors)})
            bar.update(len(chunk))
    keys = ("color", "shape", "position", "exact", "color_present", "shape_present")
    return {k: _mean(rows, k) for k in keys} | {"n": len(rows)}, rows


def color_edit_docs(corpus: ShapesCorpus, count: int, start: int = 0) -> list:
    """The first ``count`` documents of the corpus that are "same shape, new colour" edits."""
    out, i = [], start
    while len(out) < count:
        d = corpus[i]
        i += 1
        if d.meta["kind"] == "edit" and d.meta["images"][0][0].color != d.meta["images"][1][0].color:
            out.append(d)
    return out


def evaluate_edits(model, docs: list, palette, *, seed: int = 0,
                   batch: int = 16) -> tuple[dict, list[dict]]:
    """[caption, image, "now the same <shape> in <colour>."] → image; is the shape kept and
    the colour changed?"""
    rows, gen = [], torch.Generator().manual_seed(seed)
    with _bar(len(docs), "edits") as bar:
        for start in range(0, len(docs), batch):
            chunk = docs[start:start + batch]
            images = model.generate_images([d.items[:3] for d in chunk], generator=gen)
            for d, img in zip(chunk, images, strict=True):
                want = list(d.meta["images"][1])
                rows.append({"prompt": d.items[0], "source": d.items[1], "edit": d.items[2],
                             "image": img, "reference": d.images[1],
                             **score_generated(img, want, palette)})
            bar.update(len(chunk))
    keys = ("color", "shape", "position", "exact", "color_present", "shape_present")
    return {k: _mean(rows, k) for k in keys} | {"n": len(rows)}, rows


# ------------------------------------------------------------------------------- page
def png_data_uri(image: torch.Tensor) -> str:
    """(3, H, W) float image in [0, 1] → ``data:image/png;base64,…``."""
    from PIL import Image

    x = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    img = Image.frombytes("RGB", (x.shape[1], x.shape[0]), bytes(x.contiguous().view(-1).tolist()))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(t: torch.Tensor) -> str:
    return f'<img src="{png_data_uri(t)}" alt="">'


def _ok(flag) -> str:
    return '<span class="ok">✓</span>' if flag else '<span class="no">✗</span>'


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and 0 <= value <= 1:
        return f"{100 * value:.0f} %"
    return str(value)


def write_page(path, *, title: str, scores: list[tuple[str, object]],
               run: list[tuple[str, object]], captions: list[dict], t2i: list[dict],
               edits: list[dict], notes: list[str] = (), limit: int = 24) -> None:
    """One self-contained HTML page (inline base64 PNGs): notes, scores and run facts as
    (label, value) rows (fractions in [0, 1] shown as percentages), then up to ``limit``
    examples of each evaluation, saying how many of how many are shown."""
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(title)}</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:60em}img{width:96px;height:96px;"
             "image-rendering:pixelated;border:1px solid #ccc;vertical-align:middle}"
             "td,th{padding:4px 8px;border-bottom:1px solid #eee;text-align:left}"
             ".ok{color:green}.no{color:#c00}.doc{margin:6px 0}.note{background:#fff4e0;"
             "padding:8px;border-left:4px solid #e90}</style>", f"<h1>{e(title)}</h1>"]
    parts += [f"<p class='note'>{e(n)}</p>" for n in notes]
    for heading, rows in (("Scores", scores), ("Run", run)):
        parts.append(f"<h2>{heading}</h2><table>")
        parts += [f"<tr><th>{e(k)}</th><td>{e(_fmt(v))}</td></tr>" for k, v in rows]
        parts.append("</table>")

    def shown(rows: list) -> str:
        return (f"<p><small>{min(limit, len(rows))} of {len(rows)} evaluated examples shown "
                f"(the first ones); the scores above count all {len(rows)}.</small></p>")

    parts.append("<h2>Captioning: image → text</h2>" + shown(captions))
    for r in captions[:limit]:
        parts.append(f"<div class='doc'>{_img(r['image'])} <b>{e(r['caption'])}</b> "
                     f"exact {_ok(r['match'])} colour+shape {_ok(r['color_shape'])} "
                     f"<small>(truth: {e(r['truth'])})</small></div>")
    parts.append("<h2>Text → image</h2><p>prompt, generated image, rendered reference</p>"
                 + shown(t2i))
    for r in t2i[:limit]:
        parts.append(f"<div class='doc'>{e(r['prompt'])} {_img(r['image'])} {_img(r['reference'])}"
                     f" colour {_ok(r['color_present'])} shape {_ok(r['shape_present'])} "
                     f"position {_ok(r['position'])}</div>")
    parts.append("<h2>Same shape, new colour</h2><p>caption, source image, edit, generated "
                 "image, rendered reference</p>" + shown(edits))
    for r in edits[:limit]:
        parts.append(f"<div class='doc'>{e(r['prompt'])} {_img(r['source'])} {e(r['edit'])} "
                     f"{_img(r['image'])} {_img(r['reference'])} new colour "
                     f"{_ok(r['color_present'])} shape kept {_ok(r['shape'])}</div>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
