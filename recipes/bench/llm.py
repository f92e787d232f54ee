"""Cached greedy decoding of a tiny Llama with synchronizers attached.

``python recipes/benchmark.py llm [--quick] [--images 1 4 16] [--threads 1] [--repeats 3]``

Time per generated token (decode only: the difference between generating ``long`` and
``short`` new tokens, divided by ``long − short``; prefill cancels out) of:

- ``bare``: the tiny LLM alone;
- ``mmlayers``: with ``attach_synchronizers`` (every 2nd layer, paper-shaped synchronizer:
  16 heads, 8 points, levels 32², 16², 8²) inside ``handle.vision(...)``: each block's value
  projection and sampling layout (``prepare_values``) are computed once per prompt and
  reused at every step;
- ``naive``: the same adapter recomputing the value projection of all images at every
  decoding step (``cache_values=False``), as an adapter without a per-prompt cache would.

Gates are set non-zero so the synchronizers do real work. Each time is the minimum over
``--repeats`` runs (the least-disturbed one on a shared machine), measured as process CPU
time (the ratio columns) and as wall time (``wall`` ratio); the ratios are against ``bare``
measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmlayers.adapters.llm import attach_synchronizers  # noqa: E402
from mmlayers.layers.visibility import image_visibility  # noqa: E402

from bench._common import format_table  # noqa: E402

__all__ = ["main"]

BOS, SOI, IMG = 1, 3, 4


def build(images: int, *, slots: int, value_dim: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688,
                      num_hidden_layers=4, num_attention_heads=4, bos_token_id=BOS,
                      eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    row = [BOS]
    for _ in range(images):
        row += [10, 11, SOI] + [IMG] * slots
    row += [12, 13]
    ids = torch.tensor([row])
    vis, _ = image_visibility(ids, soi_id=SOI, image_id=IMG, bos_id=BOS)
    handle = attach_synchronizers(model, every=2, value_dim=value_dim, heads=16, points=8,
                                  level_sizes=(32, 16, 8), base_size=16)
    with torch.no_grad():
        for block in handle.blocks.values():
            block.gate.fill_(0.5)
    feats = torch.randn(1, images, handle.blocks["0"].sync.tokens_per_image, value_dim)
    return model, handle, ids, vis, feats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens, one repeat")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4, 16],
                        help="image counts, one row each")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per measurement (the fastest counts)")
    parser.add_argument("--slots", type=int, default=4, help="<image> tokens per image")
    parser.add_argument("--value-dim", type=int, default=256,
                        help="channels of the image pyramid the synchronizers read")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    short, long = (2, 10) if args.quick else (4, 36)
    repeats = 1 if args.quick else args.repeats
    rows = []
    for m in args.images:
        model, handle, ids, vis, feats = build(m, slots=args.slots, value_dim=args.value_dim)
        mask = torch.ones_like(ids)

        def per_token(ctx, model=model, ids=ids, mask=mask):
            def gen(k):
                with torch.no_grad(), ctx():
                    model.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                                   do_sample=False, use_cache=True)
            def timed(k):
                c0, w0 = time.process_time(), time.perf_counter()
                gen(k)
                return time.process_time() - c0, time.perf_counter() - w0

            gen(short)  # warm-up
            # min over repeats: the least-disturbed run on a shared machine
            t_long = [min(x) for x in zip(*(timed(long) for _ in range(repeats)), strict=True)]
            t_short = [min(x) for x in zip(*(timed(short) for _ in range(repeats)), strict=True)]
            return [max(a - b, 1e-9) / (long - short) for a, b in zip(t_long, t_short,
                                                                      strict=True)]

        def with_vision(cache, handle=handle, feats=feats, vis=vis):
            return lambda: handle.vision(feats, vis, cache_values=cache)

        handle.remove()
        bare = per_token(_null)
        handle = attach_again(model, handle)
        ours = per_token(with_vision(True, handle))
        naive = per_token(with_vision(False, handle))
        rows.append([m, ids.shape[1], 1e3 * bare[0], 1e3 * ours[0], 1e3 * naive[0],
                     ours[0] / bare[0], naive[0] / bare[0], naive[0] / ours[0],
                     ours[1] / bare[1]])
    print(f"tiny Llama (4 layers, d=256), synchronizers in layers 0 and 2 (16 heads, 8 points, "
          f"levels 32/16/8, value dim {args.value_dim}); threads={args.threads}; decode "
          f"{long - short} tokens; CPU ms per token")
    print(format_table(["images", "prompt", "bare ms", "mmlayers ms", "naive ms",
                        "mmlayers/bare", "naive/bare", "naive/mmlayers",
                        "mmlayers/bare wall"], rows))


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def attach_again(model, old):
    """Re-attach with the same blocks (weights kept) after measuring the bare model."""
    cfg = {k: old.config[k] for k in ("value_dim", "heads", "points", "level_sizes",
                                      "base_size")}
    handle = attach_synchronizers(model, layers=old.config["layers"], **cfg)
    handle.adapter.load_state_dict(old.adapter.state_dict())
    return handle


if __name__ == "__main__":
    main()
