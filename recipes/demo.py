"""The tiny end-to-end MM-Interleaved demo: train on the shapes corpus, evaluate, write a page.

    python recipes/demo.py                     # the full demo (CPU, no downloads)
    python recipes/demo.py --quick             # a few steps, to check that everything runs
    python recipes/demo.py --time-budget 10    # stop training early to finish in ~10 minutes

Trains the tiny model of ``recipes/configs/shapes_tiny.yaml`` (``recipes/train.py``) for a
fixed number of steps with fixed seeds, so a slower machine takes longer but gets the same
model. Then, on held-out documents, it captions images (exact: colour, shape, size and
position), generates images from captions and "same shape, new colour" edits, scores them
from their pixels, and writes ``<out>/index.html`` (inline PNGs) and ``<out>/metrics.json``.
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


def _corpora(d: dict) -> tuple[ShapesCorpus, ShapesCorpus, ShapesCorpus]:
    kw = dict(size=d["image_size"], colors=d["colors"], max_shapes=d["max_shapes"],
              jitter=d["jitter"], caption_first=d["caption_first"], tensors=True)
    return (ShapesCorpus(seed=d["eval_seed"], length=10**6, kinds=("image_caption",), **kw),
            ShapesCorpus(seed=d["eval_seed"] + 1, length=10**6, kinds=("caption_image",), **kw),
            ShapesCorpus(seed=d["eval_seed"] + 2, length=10**6, kinds=("edit",), **kw))


def evaluate(model, cfg: dict, n: int) -> tuple[dict, dict]:
    """Captions, text → image and colour edits on ``n`` held-out documents each."""
    held, pairs, edits = _corpora(cfg["data"])
    cap, cap_rows = evaluate_captions(model, held, range(n))
    t2i, t2i_rows = evaluate_text_to_image(model, pairs, range(n))
    ed, ed_rows = evaluate_edits(model, color_edit_docs(edits, n), edits.colors)
    return {"caption": cap, "t2i": t2i, "edit": ed}, {"captions": cap_rows, "t2i": t2i_rows,
                                                      "edits": ed_rows}


def estimate_eval_seconds(cfg: dict, n: int, probe: int = 8) -> float:
    """Seconds the evaluation of ``n`` documents will take here, from timing ``probe`` of
    each kind with an untrained model (which captions up to the length limit: an upper
    bound)."""
    model = train_recipe.build(cfg)[0].eval()
    t0 = time.perf_counter()
    evaluate(model, cfg, probe)
    return (time.perf_counter() - t0) * n / probe


def _scores(s: dict) -> list[tuple[str, float]]:
    c, t, e = s["caption"], s["t2i"], s["edit"]
    return [("Captions: exact (colour, shape, size and position)", c["exact"]),
            ("Captions: colour and shape only (partial)", c["color_shape"]),
            ("Text → image: asked colour present", t["color_present"]),
            ("Text → image: asked shape present", t["shape_present"]),
            ("Text → image: a shape at the asked position", t["position"]),
            ("Text → image: exact (colour, shape, position)", t["exact"]),
            ("Colour edit: new colour present", e["color_present"]),
            ("Colour edit: shape kept (at its position)", e["shape"]),
            ("Colour edit: exact (colour, shape, position)", e["exact"])]


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(train_recipe.DEFAULT_CONFIG))
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--quick", action="store_true", help="a very short run (smoke test)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the config's train.steps)")
    parser.add_argument("--eval-docs", type=int, default=None,
                        help="held-out documents per evaluation (default 100, quick 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: the config's train.threads)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="minutes for the whole demo: training stops early (the page says "
                             "so) to leave the measured evaluation time; default none, the "
                             "full fixed schedule")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    overrides = [f"train.out_dir={out / 'train'}"]
    steps = args.steps if args.steps is not None else (4 if args.quick else None)
    if steps is not None:
        overrides += [f"train.steps={steps}", f"train.warmup={min(50, max(1, steps // 10))}"]
    if args.quick:
        overrides += ["train.eval_every=0", "train.save_every=1000000"]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    cfg = train_recipe.load_config(args.config, overrides + list(args.overrides))
    out.mkdir(parents=True, exist_ok=True)  # after the config checks: a bad one leaves nothing
    if cfg["train"].get("threads"):
        torch.set_num_threads(int(cfg["train"]["threads"]))
    n = args.eval_docs or (4 if args.quick else 100)
    budget = None
    if args.time_budget is not None:
        if args.time_budget <= 0:
            raise ValueError(f"--time-budget must be positive minutes, got {args.time_budget}")
        reserve = estimate_eval_seconds(cfg, n)
        budget = max(0.0, args.time_budget * 60 - reserve - (time.perf_counter() - t0))
        logger.info("time budget %.1f min: %.0f s kept for the evaluation (measured), "
                    "training stops after %.0f s", args.time_budget, reserve, budget)
        cfg["train"]["time_limit"] = budget
    result = train_recipe.train(cfg)
    model = result["model"].eval()
    t1 = time.perf_counter()
    try:
        scores, rows = evaluate(model, cfg, n)
    except KeyboardInterrupt:
        logger.error("demo: stopped by Ctrl-C during the evaluation; the trained model is in %s "
                     "(MMInterleaved.from_pretrained); no page was written",
                     Path(cfg["train"]["out_dir"]) / "model")
        raise SystemExit(130) from None
    eval_seconds = time.perf_counter() - t1
    last = result["history"][-1] if result["history"] else {}
    cut = result["stopped_by_time_limit"]
    metrics = {
        "caption_exact": round(scores["caption"]["exact"], 3),
        "caption_color_shape": round(scores["caption"]["color_shape"], 3),
        **{f"t2i_{k}": round(v, 3) for k, v in scores["t2i"].items() if k != "n"},
        **{f"edit_{k}": round(v, 3) for k, v in scores["edit"].items() if k != "n"},
        "eval_images": {"captions": scores["caption"]["n"], "t2i": scores["t2i"]["n"],
                        "edits": scores["edit"]["n"]},
        "train_steps": result["steps"], "planned_steps": cfg["train"]["steps"],
        "stopped_by_time_limit": cut,
        "final_loss": {k: round(last.get(k, float("nan")), 4)
                       for k in ("loss", "text_loss", "image_loss")},
        "train_seconds": round(result["seconds"], 1), "eval_seconds": round(eval_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }
    notes = []
    if cut:
        notes.append(f"Training was cut short by the time budget ({args.time_budget} min): "
                     f"{result['steps']} of {cfg['train']['steps']} steps. These scores are "
                     f"not those of the full demo.")
    run_rows = [("Training steps", f"{result['steps']} of {cfg['train']['steps']}"
                 + (" (cut by the time budget)" if cut else "")),
                ("Final training loss (total / text / image)",
                 " / ".join(str(v) for v in metrics["final_loss"].values())),
                ("Training time", f"{metrics['train_seconds']} s"),
                ("Evaluation time", f"{metrics['eval_seconds']} s"),
                ("Whole demo", f"{metrics['total_seconds']} s"),
                ("Torch threads", metrics["threads"])]
    write_page(out / "index.html", title="mmlayers: tiny MM-Interleaved on shapes",
               scores=_scores(scores), run=run_rows, notes=notes, **rows)
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    logger.info("metrics %s", json.dumps(metrics))
    if cut:
        logger.info("training was cut short by the time budget: %d of %d steps",
                    result["steps"], cfg["train"]["steps"])
    logger.info("wrote %s", out / "index.html")
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    with logging_redirect_tqdm():
        run(argv)


if __name__ == "__main__":
    main()
