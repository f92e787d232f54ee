"""VisualTokenizer throughput on CPU, split into ViT / pyramid / resampler.

A CLIP-shaped ViT at the paper's geometry (224 px, patch 14 → 16 × 16 grid + CLS, 24
layers) with a reduced width, the ViT-Adapter pyramid (64², 32², 16², 8²), the ViTDet
simple pyramid for comparison, and a 64-query, 12-layer resampler. Rows are inference
(``torch.no_grad``) times, the best of ``--rounds`` interleaved rounds of a median of
``--repeats`` runs; the ratio column is time / the bare ViT's forward, measured
in the same run. Besides wall time, each part's process CPU time is measured: on the
shared 2-core machine other jobs inflate wall time, while single-threaded CPU time is
what the part itself costs, so ratios and images/s use CPU time (run with
``--threads 1``).

    python recipes/benchmark.py vision [--width 256] [--batch 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import torch

from bench._common import format_table, measure, peak_memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py vision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256, help="ViT hidden size (ViT-L: 1024)")
    parser.add_argument("--depth", type=int, default=24, help="ViT layers")
    parser.add_argument("--heads", type=int, default=8, help="ViT heads")
    parser.add_argument("--resampler-dim", type=int, default=256, help="resampler width (paper: 768)")
    parser.add_argument("--batch", type=int, default=2, help="images per forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per round (median)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (min)")
    parser.add_argument("--backend", default=None, help="deformable-attention backend (default auto)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)

    from transformers import CLIPVisionConfig

    from mmlayers.layers.pyramid import SimpleFeaturePyramid
    from mmlayers.vision import VisualTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=args.width, intermediate_size=4 * args.width,
                           num_hidden_layers=args.depth, num_attention_heads=args.heads,
                           image_size=224, patch_size=14)
    rkw = {"llm_dim": 512, "num_tokens": 64, "resampler_dim": args.resampler_dim,
           "resampler_depth": 12, "resampler_heads": max(1, args.resampler_dim // 64),
           "cross_every": 2, "pyramid_kwargs": {"backend": args.backend}}
    tok = VisualTokenizer.from_config(cfg, **rkw).eval()
    vit, pyramid, resampler = tok.vit, tok.pyramid, tok.resampler
    simple = SimpleFeaturePyramid(args.width, grid_size=vit.grid_size).eval()
    images = torch.rand(args.batch, 3, 224, 224)
    x = (images - tok.image_mean) / tok.image_std
    with torch.no_grad():
        hidden = vit(x)
        ctx = tok.resampler_context(hidden)
        vit_map = hidden[:, 1:].transpose(1, 2).reshape(args.batch, args.width, *vit.grid_size)

    cases = {
        "ViT alone": lambda: vit(x),
        "ViT + adapter pyramid": lambda: pyramid(x, vit),
        "simple pyramid (after ViT)": lambda: simple(vit_map),
        "resampler (64 q, 12 layers)": lambda: resampler(ctx),
        "VisualTokenizer (all)": lambda: tok(images),
    }
    # The machine is shared: measure all cases in interleaved rounds and keep each case's
    # fastest round, so a burst of foreign load hits one round, not one case.
    times = dict.fromkeys(cases, float("inf"))
    cpu = dict.fromkeys(cases, float("inf"))
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in cases.items():
                times[name] = min(times[name], measure(fn, repeats=args.repeats))
                cpu[name] = min(cpu[name], _cpu_seconds(fn, args.repeats))
        mems = {name: peak_memory(fn) for name, fn in cases.items()}
    over = "adapter overhead (pyramid − ViT)"
    times[over] = times["ViT + adapter pyramid"] - times["ViT alone"]
    cpu[over] = cpu["ViT + adapter pyramid"] - cpu["ViT alone"]
    mems[over] = float("nan")
    c_vit = cpu["ViT alone"]
    rows = []
    for name, t in times.items():
        mem, c = mems[name], cpu[name]
        rows.append([name, t * 1e3, c * 1e3, args.batch / c if c > 0 else float("inf"),
                     "—" if mem != mem else mem / 2**20, c / c_vit])
    print(f"VisualTokenizer on CPU ({date.today()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads): CLIP-shaped ViT 224 px / patch 14 "
          f"(16x16 grid + CLS), width {args.width}, depth {args.depth}; resampler width "
          f"{args.resampler_dim}; batch {args.batch}; deformable backend {args.backend or 'auto'}")
    print(format_table(["part", "wall ms", "CPU ms", "images/s (CPU)", "peak MiB", "× ViT (CPU)"],
                       rows))
    ratio = (cpu[over] + cpu["resampler (64 q, 12 layers)"]) / c_vit
    print(f"\n(pyramid overhead + resampler) / ViT, CPU time = {ratio:.2f} (target <= 1)")


def _cpu_seconds(fn, repeats: int) -> float:
    """Median process CPU seconds of ``fn`` (robust to other processes when
    single-threaded; with more threads it counts every thread's time)."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return statistics.median(out)
