"""Continue interleaved documents with a saved model: text, images, or both in turns.

    python recipes/generate.py --model out/shapes_tiny/model --input requests.json --out gen/

``--input`` is JSON in the official MM-Interleaved inference format (``sentences``,
``images``, ``sentence_ixs``, ``image_first``, ``generate_mode``, ``num_iter``) or ours
(``items``, ``generate``: text | image | interleaved, ``turns``; see
:mod:`mmlayers.data.inference_format`). Each request runs in an
:class:`~mmlayers.models.InterleavedSession` (KV cache and image features kept across
turns). Writes ``<out>/results.json`` (per request: the document as text and image files,
which items are generated), ``<out>/images/*.png`` and ``<out>/index.html``.

``--official`` runs official-format requests with the official semantics (see
``mmlayers.data.inference_format``: ``generate_images`` regenerates the last listed image,
text turns may open an image that the next turn draws, input images are center-cropped)
and the official text decoding (nucleus sampling, top-p 0.9, repetition penalty 1.3,
8 to 90 new tokens per turn); explicit flags still override the decoding values. A text
turn that ends with ``</s>`` ends the request (the official loop would drop the ``</s>``
and go on until ``num_iter``).

A request that produces fewer turns than it asks for (the model ended the document with
``</s>``, or a turn wrote nothing visible) is reported with a warning and in
``results.json`` (``turns`` asked, ``turns_done``); prompt words outside the tokenizer's
vocabulary (read as ``<unk>``) are warned about before generation. Text generation never
picks ``<pad>`` or ``<unk>``, and each ``generate: text`` turn writes at least one token.

Everything is checked (numeric options, that ``--out`` can be written, model directory,
request file, every image) before any generation, and the output is written to a
temporary directory that is renamed to ``--out`` at the end (missing parent directories
are created then), so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import png_data_uri  # noqa: E402

from mmlayers.data import read_generation_requests, to_pil  # noqa: E402
from mmlayers.models import InterleavedSession, MMInterleaved  # noqa: E402

logger = logging.getLogger("generate")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="directory written by save_pretrained")
    p.add_argument("--input", required=True, help="JSON requests (official format or ours)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (official 90)")
    p.add_argument("--min-new-tokens", type=int, default=None, help="default 0 (official 8)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="default 1 (official 1.3)")
    p.add_argument("--official", action="store_true",
                   help="official semantics and decoding for official-format requests")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: config)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: config)")
    p.add_argument("--scheduler", default=None, help="diffusers scheduler class, e.g. DDIMScheduler")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--sample", action="store_true", help="sample text (default greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None, help="default none (official 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    for name, ok, what in (("max_new_tokens", lambda v: v >= 1, ">= 1"),
                           ("min_new_tokens", lambda v: v >= 0, ">= 0"),
                           ("repetition_penalty", lambda v: v > 0, "> 0"),
                           ("steps", lambda v: v >= 1, ">= 1"), ("num_beams", lambda v: v >= 1, ">= 1"),
                           ("temperature", lambda v: v > 0, "> 0"),
                           ("top_p", lambda v: 0 < v <= 1, "in (0, 1]")):
        value = getattr(args, name)
        if value is not None and not ok(value):
            p.error(f"--{name.replace('_', '-')} must be {what}, got {value}")
    official = {"max_new_tokens": 90, "min_new_tokens": 8, "repetition_penalty": 1.3,
                "top_p": 0.9} if args.official else {}
    plain = {"max_new_tokens": 32, "min_new_tokens": 0, "repetition_penalty": 1.0}
    for k, v in {**plain, **official}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.sample = args.sample or args.official
    return args


def load(args):
    """Requests, then the model: every input problem surfaces before generation starts."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} exists and is not an empty directory")
    base = next(d for d in out.absolute().parents if d.exists())  # where it will be created
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise ValueError(f"--out {str(out)!r} cannot be written ({str(base)!r}: "
                         f"{err.strerror or err}); expected a path in a writable "
                         f"directory") from None
    requests = read_generation_requests(args.input, official=args.official)
    if not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model {args.model!r} has no config.json (a directory written by "
                         f"MMInterleaved.save_pretrained is expected)")
    model = MMInterleaved.from_pretrained(args.model, train_policy=False)
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    if model.tokenizer is None:
        raise ValueError(f"--model {args.model!r} was saved without a tokenizer")
    if getattr(model, "unet", None) is None:
        bad = [i for i, r in enumerate(requests) if r.generate != "text"]
        if bad:
            raise ValueError(f"requests {bad} ask for images but the model has no image decoder")
    return requests, model


def run_request(model, req, args) -> tuple[list[tuple[object, bool]], int, str]:
    """→ the document as (item, generated?) pairs, how many turns produced text or an
    image, and why generation stopped before ``req.turns`` ("" when it did not). A text
    turn (``generate: text``) writes at least one token before ``</s>``."""
    o = req.options
    seed = o.get("seed", args.seed)
    gen = torch.Generator().manual_seed(seed)
    image_kw = dict(num_inference_steps=o.get("num_inference_steps", args.steps),
                    guidance_scale=o.get("guidance_scale", args.guidance),
                    scheduler=args.scheduler, generator=gen)
    text_kw = dict(do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                   num_beams=args.num_beams, generator=torch.Generator().manual_seed(seed),
                   repetition_penalty=args.repetition_penalty,
                   min_new_tokens=args.min_new_tokens)
    max_new = o.get("max_new_tokens", args.max_new_tokens)
    session = InterleavedSession(model)
    if req.official:
        return _run_official(session, req, max_new, image_kw, text_kw)
    for item in req.items:
        (session.add_text if isinstance(item, str) else session.add_image)(item)
    start, done, why = len(session.items), 0, ""
    if req.generate == "text":
        text_kw["min_new_tokens"] = max(1, text_kw["min_new_tokens"])
    for turn in range(1, req.turns + 1):
        if req.generate == "image":
            session.generate_image(**image_kw)
            done += 1
            continue
        result = session.generate_text(max_new, allow_image=req.generate == "interleaved",
                                       **text_kw)
        if result.image_opened:
            session.generate_image(**image_kw)
        done += bool(result.text or result.image_opened)
        if not (result.text or result.image_opened or why):
            why = f"turn {turn} wrote no visible text"
        if result.finished or len(session.ids) >= session.max_length:
            why = (f"the model ended the document (</s>) in turn {turn}" if result.finished
                   else f"the document reached max_length={session.max_length} in turn {turn}")
            break
    return [(item, i >= start) for i, item in enumerate(session.items)], done, why


def _run_official(session, req, max_new, image_kw, text_kw):
    """The official loop: ``turns`` iterations, each a text turn or an image; a text turn
    that opens an image makes the next iteration draw it; ``generate_images`` first
    regenerates the last listed image (``req.target_index``). Returns what
    :func:`run_request` does."""
    add = {str: session.add_text}
    cut = req.target_index if req.target_index is not None else len(req.items)
    for item in req.items[:cut]:
        add.get(type(item), session.add_image)(item)
    flags = [False] * len(session.items)
    mode = "image" if req.target_index is not None else "text"
    done, why = 0, ""
    for turn in range(req.turns):
        if mode == "image":
            session.generate_image(**image_kw)
            flags.append(True)
            done += 1
            if turn == 0 and req.target_index is not None:  # the rest of the request
                for item in req.items[cut + 1:]:
                    add.get(type(item), session.add_image)(item)
                flags += [False] * (len(session.items) - len(flags))
            mode = "text"
            continue
        result = session.generate_text(max_new, allow_image=True, **text_kw)
        flags += [True] * (len(session.items) - len(flags))
        done += bool(result.text or result.image_opened)
        if result.image_opened:
            mode = "image"
        elif result.finished:
            why = f"the model ended the document (</s>) in turn {turn + 1}"
            break
    return list(zip(session.items, flags, strict=True)), done, why


def warn_unknown_words(tokenizer, requests) -> None:
    """Warn about prompt words the tokenizer does not know (they become ``<unk>``)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    for i, req in enumerate(requests):
        words = []
        for text in (x for x in req.items if isinstance(x, str) and unk is not None):
            if not getattr(tokenizer, "is_fast", False):  # no offsets: name the text
                words += [text] if unk in tokenizer(text, add_special_tokens=False)[
                    "input_ids"] else []
                continue
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            words += [text[a:b] for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"],
                                                     strict=True) if t == unk]
        if words:
            logger.warning("request %d: %d word(s) not in the model's vocabulary, read as "
                           "%s: %s", i, len(words), tokenizer.unk_token,
                           ", ".join(map(repr, dict.fromkeys(words))))


def write(out: Path, docs, requests, done) -> None:
    e = html.escape
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        results = []
        parts = ["<!doctype html><meta charset='utf-8'><title>mmlayers generation</title>"
                 "<style>body{font-family:sans-serif;margin:2em}img{width:160px;"
                 "vertical-align:middle;margin:4px;border:1px solid #ccc}.gen{background:"
                 "#eef6ff}.doc{border-bottom:1px solid #ddd;padding:1em 0}</style>"
                 "<h1>Generated documents</h1><p>Generated items have a blue background.</p>"]
        for i, (doc, req) in enumerate(zip(docs, requests, strict=True)):
            items, n_img = [], 0
            parts.append(f"<div class='doc'><h2>Request {i} ({e(req.generate)})</h2>")
            for item, generated in doc:
                cls = " class='gen'" if generated else ""
                if isinstance(item, str):
                    items.append({"text": item, "generated": generated})
                    parts.append(f"<span{cls}>{e(item)}</span> ")
                else:
                    name = f"images/{i:03d}_{n_img:02d}.png"
                    to_pil(item).save(tmp / name)
                    n_img += 1
                    items.append({"image": name, "generated": generated})
                    parts.append(f"<img{cls} src='{png_data_uri(item)}' alt='{name}'>")
            parts.append("</div>")
            results.append({"request": i, "generate": req.generate, "turns": req.turns,
                            "turns_done": done[i], "items": items})
        (tmp / "results.json").write_text(json.dumps(results, indent=1))
        (tmp / "index.html").write_text("\n".join(parts))
        if out.exists():
            out.rmdir()  # checked empty in load()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> list:
    args = parse(argv)
    try:
        requests, model = load(args)
    except ValueError as err:
        raise SystemExit(f"generate.py: {err}") from None
    warn_unknown_words(model.tokenizer, requests)
    docs, done = [], []
    for i, req in enumerate(requests):
        logger.info("request %d/%d: %s, %d turn(s)", i + 1, len(requests), req.generate, req.turns)
        try:
            doc, n, why = run_request(model, req, args)
        except ValueError as err:  # e.g. the context length; nothing has been written
            raise SystemExit(f"generate.py: request {i}: {err}") from None
        if n < req.turns:
            logger.warning("request %d: asked for %d %s turn(s), %d produced text or an "
                           "image: %s", i, req.turns, req.generate, n, why)
        docs.append(doc)
        done.append(n)
    write(Path(args.out), docs, requests, done)
    logger.info("wrote %s", args.out)
    return docs


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
