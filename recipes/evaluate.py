"""Run the paper's zero-shot benchmarks on a saved model and score them.

    python recipes/evaluate.py --model out/model --tasks coco_caption,vqav2 \\
        --data-root data/eval --out eval/

Each task reads ``<data-root>/<task>/annotations.json`` (the layout in
``mmlayers.evaluation.readers`` and docs/evaluation.md), prompts the model with the
official template and decoding settings (``mmlayers.evaluation.TASKS``; ``--max-new-tokens``,
``--num-beams`` and ``--steps`` override them for quick runs), and scores the predictions:
CIDEr-D and BLEU-4 for captions (METEOR when Java and pycocoevalcap are installed), VQA
accuracy after the official answer extraction, VisDial NDCG of the options ranked by
their log-likelihood, and generated images written to disk for
text-to-image (with their CLIP similarity to the caption and to the real image when
``--clip`` names a local CLIP model). Predictions are appended to
``<out>/<task>/predictions.jsonl`` as they are made, so a re-run with the same ``--out``
generates only the missing ones. Under ``accelerate launch`` the missing items are split
over the processes, gathered, and scored once by the main process. Writes
``<out>/results.json`` (settings, scores, and every optional metric that was skipped with
the reason) and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from mmlayers.evaluation import (
    IMAGE,
    bleu,
    cider_d,
    clip_similarity,
    extract_vqa_answer,
    get_task,
    ndcg,
    option_log_likelihoods,
    read_task_items,
    render_prompt,
    visdial_prompt,
    vqa_accuracy,
)
from mmlayers.models import InterleavedSession, MMInterleaved

logger = logging.getLogger("evaluate")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="directory written by save_pretrained")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--data-root", required=True, help="directory with one folder per task")
    p.add_argument("--out", required=True, help="output directory (re-use it to resume)")
    p.add_argument("--max-items", type=int, default=None, help="first N items of each task")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the task's")
    p.add_argument("--num-beams", type=int, default=None, help="override the task's")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (override)")
    p.add_argument("--clip", default=None,
                   help="local transformers CLIP directory for the CLIP scores of generated "
                        "images (the official evaluation uses clip-vit-large-patch14)")
    p.add_argument("--candidates", type=int, default=None,
                   help="images per caption reranked by CLIP (default: the task's; needs --clip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    args.tasks = [get_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
    if not args.tasks:
        raise ValueError("--tasks names no task")
    return args


def prompt_session(session, pieces, image_path=None):
    """Start a fresh document with the rendered prompt (IMAGE → the item's image)."""
    session.reset()
    for piece in pieces:
        if piece == IMAGE:
            if image_path is None:
                return  # text-to-image: the image is what gets generated
            session.add_image(Image.open(image_path).convert("RGB"))
        else:
            session.add_text(piece)


def predict(session, task, item, args, out_dir):
    """One prediction: generated text (caption, VQA) or the path of a generated image."""
    if task.kind == "text_to_image":
        steps = args.steps or task.image.num_inference_steps
        count = args.candidates or task.image.num_candidates
        if args.clip is None:
            count = 1  # nothing to rerank with; the report says so
        images = []
        for k in range(count):  # candidate k is seeded with seed + k in every process
            prompt_session(session, render_prompt(task, caption=item["caption"]))
            images.append(session.generate_image(
                num_inference_steps=steps, guidance_scale=task.image.guidance_scale,
                generator=torch.Generator().manual_seed(args.seed + k)))
        best = 0
        if count > 1:  # keep the candidate closest to its caption, as the official run does
            model, processor = clip_model(args)
            sims = [clip_similarity(model, processor, [im], texts=[item["caption"]])
                    ["clip_text_image"] for im in images]
            best = max(range(count), key=sims.__getitem__)
        path = out_dir / "images" / f"{item['id']}.png"
        path.parent.mkdir(exist_ok=True)
        images[best].save(path)
        return str(path)
    if task.kind == "visdial":  # the official generate_scores mode
        context, _ = visdial_prompt(item["caption"], item["dialog"], item["round"])
        image = Image.open(item["image"]).convert("RGB")
        return option_log_likelihoods(session.model, [image, context], item["options"]).tolist()
    question = item.get("question")
    prompt_session(session, render_prompt(task, question=question), item["image"])
    t = task.text
    beams = args.num_beams or t.num_beams  # the session's beam search has no penalty
    return session.generate_text(
        max_new_tokens=args.max_new_tokens or t.max_new_tokens, num_beams=beams,
        length_penalty=t.length_penalty, allow_image=False,
        repetition_penalty=t.repetition_penalty if beams == 1 else 1.0,
        min_new_tokens=min(t.min_length, args.max_new_tokens or t.min_length)).text.strip()


def load_cache(task_dir):
    """Cached predictions of every earlier run and process (``predictions*.jsonl``)."""
    recs = [json.loads(line) for path in sorted(task_dir.glob("predictions*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]
    return {rec["id"]: rec["prediction"] for rec in recs}


def process_state(cpu: bool):
    """(rank, world size, barrier, gather) from ``accelerate`` when it is installed; one
    process otherwise. ``cpu``: the processes join a gloo group on the CPU."""
    try:
        from accelerate import PartialState
        from accelerate.utils import gather_object
    except ImportError:
        return 0, 1, lambda: None, lambda x: x
    state = PartialState(cpu=cpu)
    return state.process_index, state.num_processes, state.wait_for_everyone, gather_object


def meteor(candidates, references):
    """METEOR through pycocoevalcap's Java scorer, or (None, why it was skipped)."""
    if shutil.which("java") is None:
        return None, "Java is not installed (METEOR 1.5 is a Java program)"
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None, "pycocoevalcap is not installed"
    from mmlayers.evaluation import ptb_tokenize
    gts = {k: [ptb_tokenize(r) for r in v] for k, v in references.items()}
    res = {k: [ptb_tokenize(v)] for k, v in candidates.items()}
    try:
        return float(Meteor().compute_score(gts, res)[0]), None
    except Exception as e:  # the Java subprocess can fail in many ways; report it
        return None, f"the METEOR scorer failed: {e!r}"


def clip_model(args):
    """The ``--clip`` model and processor, loaded once."""
    if getattr(args, "_clip", None) is None:
        from transformers import CLIPModel, CLIPProcessor
        args._clip = (CLIPModel.from_pretrained(args.clip).eval(),
                      CLIPProcessor.from_pretrained(args.clip))
    return args._clip


def clip_scores(args, items, preds):
    """CLIP similarities of the generated images, or (None, why they were skipped)."""
    if args.clip is None:
        return None, "no --clip directory given (a local transformers CLIP model)"
    model, processor = clip_model(args)
    images = [Image.open(preds[it["id"]]).convert("RGB") for it in items]
    real = [it.get("image") for it in items]
    refs = [Image.open(r).convert("RGB") for r in real] if all(real) else None
    return clip_similarity(model, processor, images, texts=[it["caption"] for it in items],
                           references=refs), None


def score(task, items, preds, args):
    """→ (scores, skipped: metric → reason)."""
    skipped = {}
    if task.kind == "caption":
        cands = {str(it["id"]): preds[it["id"]] for it in items}
        refs = {str(it["id"]): list(it["references"]) for it in items}
        scores = {"CIDEr-D": cider_d(cands, refs), "BLEU-4": bleu(cands, refs, n=4)}
        value, why = meteor(cands, refs)
        if why is None:
            scores["METEOR"] = value
        else:
            skipped["METEOR"] = why
        skipped["SPICE"] = ("needs Stanford CoreNLP models that pycocoevalcap downloads on "
                            "first use; nothing is downloaded at run time")
        return scores, skipped
    if task.kind == "vqa":
        accs = [vqa_accuracy(extract_vqa_answer(preds[it["id"]]), it["answers"],
                             style=task.vqa_style) for it in items]
        return {"VQA accuracy": sum(accs) / len(accs)}, skipped
    if task.kind == "visdial":
        return {"NDCG": ndcg([preds[it["id"]] for it in items],
                             [it["relevance"] for it in items])}, skipped
    skipped["FID"] = ("not computed by this recipe yet: the generated images are in "
                      "<out>/<task>/images, the statistics go to "
                      "mmlayers.evaluation.frechet_distance")
    scores = {"images": len(items)}
    clip, why = clip_scores(args, items, preds)
    if why is None:
        scores.update(clip)
    else:
        skipped["CLIP score"] = why
    if (args.candidates or task.image.num_candidates) > 1 and args.clip is None:
        skipped["CLIP rerank"] = (f"one image per caption instead of "
                                  f"{task.image.num_candidates} reranked: no --clip model")
    return scores, skipped


def run_task(model, task, args, out):
    items = read_task_items(args.data_root, task.name, task.kind)[: args.max_items]
    task_dir = out / task.name
    task_dir.mkdir(parents=True, exist_ok=True)
    rank, world, barrier, gather = args.procs
    preds = load_cache(task_dir)
    todo = [it for it in items if it["id"] not in preds]
    barrier()  # every process has read the same cache before any writes to it
    mine = todo[rank::world]  # each missing item is generated by exactly one process
    logger.info("%s: %d items, %d cached, %d to generate (%d here)", task.name, len(items),
                len(items) - len(todo), len(todo), len(mine))
    session = InterleavedSession(model)
    try:
        from tqdm import tqdm
        mine_iter = tqdm(mine, desc=f"{task.name} [{rank}]", disable=None)
    except ImportError:
        mine_iter = mine
    cache = task_dir / ("predictions.jsonl" if world == 1 else f"predictions.rank{rank}.jsonl")
    new = []
    with torch.no_grad(), cache.open("a") as f:
        for it in mine_iter:
            new.append((it["id"], predict(session, task, it, args, task_dir)))
            f.write(json.dumps({"id": it["id"], "prediction": new[-1][1]}) + "\n")
            f.flush()
    preds.update(gather(new))
    barrier()
    if rank != 0:
        return None
    scores, skipped = score(task, items, preds, args)
    return {"items": len(items), "generated_now": len(todo), "processes": world,
            "scores": scores,
            "skipped": skipped,
            "settings": {"text": vars(task.text) if task.text else None,
                         "image": vars(task.image) if task.image else None,
                         "overrides": {"max_new_tokens": args.max_new_tokens,
                                       "num_beams": args.num_beams, "steps": args.steps,
                                       "candidates": args.candidates},
                         "beam_search_ignores": "min_length, repetition_penalty"},
            "predictions": {str(it["id"]): preds[it["id"]] for it in items}}


def markdown(results):
    lines = ["| task | items | scores | skipped |", "|---|---|---|---|"]
    for name, r in results.items():
        scores = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in r.get("scores", {}).items())
        skipped = ", ".join(r.get("skipped", {}))
        lines.append(f"| {name} | {r.get('items', 0)} | {scores} | {skipped} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse(argv)
    if not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model {args.model!r} has no config.json (a directory written by "
                         "MMInterleaved.save_pretrained is expected)")
    for task in args.tasks:  # check every data file before loading the model
        read_task_items(args.data_root, task.name, task.kind)
    model = MMInterleaved.from_pretrained(args.model, train_policy=False).to(args.device).eval()
    if model.tokenizer is None:
        raise ValueError(f"--model {args.model!r} was saved without a tokenizer")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.procs = process_state(cpu=args.device == "cpu")
    results = {t.name: run_task(model, t, args, out) for t in args.tasks}
    if args.procs[0] != 0:
        return None  # rank 0 scores and writes the report
    report = {"model": os.path.abspath(args.model), "seed": args.seed, "tasks": results}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(results))
    return report


if __name__ == "__main__":
    main()
