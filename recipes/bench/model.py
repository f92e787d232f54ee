"""The tiny MM-Interleaved end to end on CPU: a training step and its synchronizer share.

One training step (forward + backward) of ``MMInterleavedConfig.tiny`` on a fixed batch of
shapes documents (every one an edit: caption, image, edit text, image, so every second
image has a previous image for the UNet synchronizers), with

- everything on (the reference row);
- the LLM synchronizers' hooks removed (the LLM is then the plain LLM);
- the UNet synchronizers idle (no image has a previous one, ``no_image="zero"``);
- both off;

plus captioning (greedy, 8 tokens) and image generation (DDIM, ``--gen-steps`` steps, CFG)
per image. Times are process CPU seconds (the best of ``--rounds`` rounds of a median of
``--repeats``): on a shared machine other jobs inflate wall time, single-threaded CPU time
is what the model costs (run with ``--threads 1``). Ratios are against the full step
measured in the same run.

    python recipes/benchmark.py model [--quick] [--threads 1] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import torch

from bench._common import format_table


def _cpu_time(fn, repeats: int, rounds: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        best = min(best, statistics.median(times))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="edit documents per step")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per round (median)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds (the best counts)")
    parser.add_argument("--gen-steps", type=int, default=10, help="DDIM steps per image")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--quick", action="store_true", help="batch 4, one round of 2")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.rounds = 4, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    from mmlayers.data import InterleavedCollator, ShapesCorpus, word_level_tokenizer
    from mmlayers.models import MMInterleaved, MMInterleavedConfig

    corpus = ShapesCorpus(seed=0, length=1000, kinds=("edit",), max_shapes=1, tensors=True)
    tok = word_level_tokenizer(corpus.vocabulary())

    def build(no_image: str = "official") -> MMInterleaved:
        torch.manual_seed(0)
        cfg = MMInterleavedConfig.tiny(vocab_size=len(tok))
        cfg.decoder.sync_no_image = no_image
        return MMInterleaved.from_config(cfg, tokenizer=tok)

    docs = [corpus[i] for i in range(args.batch)]
    batch = InterleavedCollator(tokenizer=tok, num_image_tokens=8, max_length=96)(docs)
    no_prev = InterleavedCollator(tokenizer=tok, num_image_tokens=8, max_length=96)(docs)
    no_prev.image_previous.fill_(-1)

    def step(model, b):
        def run():
            out = model(b, generator=torch.Generator().manual_seed(0))
            out.loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    full = build()
    no_llm = build()
    no_llm.sync_handle.remove()
    idle_unet = build("zero")
    both = build("zero")
    both.sync_handle.remove()
    rows, ref = [], None
    m = int(batch.images.shape[0])
    for name, model, b in (("train step, all synchronizers", full, batch),
                           ("train step, no LLM synchronizers", no_llm, batch),
                           ("train step, UNet synchronizers idle", idle_unet, no_prev),
                           ("train step, both off", both, no_prev)):
        t = _cpu_time(step(model, b), args.repeats, args.rounds)
        ref = t if ref is None else ref
        rows.append([name, f"{args.batch} docs / {m} images", t, t / ref])
    full.eval()
    images = batch.images[: min(4, m)]
    t = _cpu_time(lambda: full.caption(images, max_new_tokens=8), args.repeats, args.rounds)
    rows.append(["caption (greedy, 8 tokens)", f"{len(images)} images", t, t / ref])
    prompts = [[d.items[0], d.items[1], d.items[2]] for d in docs[: len(images)]]
    t = _cpu_time(lambda: full.generate_images(prompts, num_inference_steps=args.gen_steps,
                                               generator=torch.Generator().manual_seed(0)),
                  args.repeats, args.rounds)
    rows.append([f"edit generation (DDIM {args.gen_steps}, CFG)", f"{len(images)} images",
                 t, t / ref])
    print(f"model suite, {date.today()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), CPU seconds")
    print(format_table(["what", "size", "CPU s", "ratio vs full step"], rows))


if __name__ == "__main__":
    main()
