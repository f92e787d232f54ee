"""The tiny end-to-end MM-Interleaved demo: train on the shapes corpus, evaluate, write a page.

    python recipes/demo.py                 # full demo (CPU, no downloads)
    python recipes/demo.py --quick         # a few steps, to check that everything runs

Trains the tiny model of ``recipes/configs/shapes_tiny.yaml`` (``recipes/train.py``), then
on held-out documents: captions images (exact colour + shape match), generates images
from captions and "same shape, new colour" edits, scores them from their pixels, and
writes ``<out>/index.html`` (inline PNGs) and ``<out>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train as train_recipe  # noqa: E402
from _report import (  # noqa: E402
    color_edit_docs,
    evaluate_captions,
    evaluate_edits,
    evaluate_text_to_image,
    write_page,
)

from mmlayers.data import ShapesCorpus  # noqa: E402

logger = logging.getLogger("demo")


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(train_recipe.DEFAULT_CONFIG))
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--quick", action="store_true", help="a very short run (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--eval-docs", type=int, default=None,
                        help="held-out documents per evaluation (default 100, quick 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--time-budget", type=float, default=15.0,
                        help="minutes for the whole demo; training stops early (and says so) "
                             "to leave time for the evaluation")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"train.out_dir={out / 'train'}"]
    steps = args.steps if args.steps is not None else (4 if args.quick else None)
    if steps is not None:
        overrides += [f"train.steps={steps}", f"train.warmup={min(50, max(1, steps // 10))}"]
    if args.quick:
        overrides += ["train.eval_every=0", "train.save_every=1000000"]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    if args.time_budget and not args.quick:   # keep ~2 minutes for building and evaluating
        overrides.append(f"train.time_limit={max(60.0, args.time_budget * 60 - 120)}")
    cfg = train_recipe.load_config(args.config, overrides + list(args.overrides))
    result = train_recipe.train(cfg)
    model = result["model"].eval()
    train_seconds = result["seconds"]

    n = args.eval_docs or (4 if args.quick else 100)
    d = cfg["data"]
    kw = dict(size=d["image_size"], colors=d["colors"], max_shapes=d["max_shapes"],
              jitter=d["jitter"], caption_first=d["caption_first"], tensors=True)
    held = ShapesCorpus(seed=d["eval_seed"], length=10**6, kinds=("image_caption",), **kw)
    pairs = ShapesCorpus(seed=d["eval_seed"] + 1, length=10**6, kinds=("caption_image",), **kw)
    edits = ShapesCorpus(seed=d["eval_seed"] + 2, length=10**6, kinds=("edit",), **kw)
    t1 = time.perf_counter()
    cap_acc, cap_rows = evaluate_captions(model, held, range(n))
    t2i, t2i_rows = evaluate_text_to_image(model, pairs, range(n))
    ed, ed_rows = evaluate_edits(model, color_edit_docs(edits, n), edits.colors)
    eval_seconds = time.perf_counter() - t1
    last = result["history"][-1] if result["history"] else {}
    metrics = {
        "caption_exact_match": round(cap_acc, 3),
        "t2i_color_present": round(t2i["color_present"], 3),
        "t2i_shape_present": round(t2i["shape_present"], 3),
        "t2i_color_at_position": round(t2i["color"], 3),
        "t2i_shape_at_position": round(t2i["shape"], 3),
        "t2i_position": round(t2i["position"], 3),
        "t2i_exact": round(t2i["exact"], 3),
        "edit_shape_kept": round(ed["shape"], 3),
        "edit_new_color_present": round(ed["color_present"], 3),
        "edit_exact": round(ed["exact"], 3),
        "eval_images": {"captions": len(cap_rows), "t2i": t2i["n"], "edits": ed["n"]},
        "train_steps": last.get("step", 0),
        "final_loss": {k: round(last.get(k, float("nan")), 4)
                       for k in ("loss", "text_loss", "image_loss")},
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }
    write_page(out / "index.html", title="mmlayers: tiny MM-Interleaved on shapes",
               metrics=metrics, captions=cap_rows, t2i=t2i_rows, edits=ed_rows)
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    logger.info("metrics %s", json.dumps(metrics))
    logger.info("wrote %s", out / "index.html")
    return metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    run(argv)


if __name__ == "__main__":
    main()
