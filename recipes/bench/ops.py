"""``ops``: the deformable-attention op, our backends vs transformers' implementation.

    python recipes/benchmark.py ops                 # every shape of the op issue
    python recipes/benchmark.py ops --only mmfs16   # the target shape (16 images)
    python recipes/benchmark.py ops --quick         # toy sizes, seconds

Prints one markdown table: forward and forward+backward milliseconds and peak memory per
implementation, and the ratio of transformers' time / ours (higher is better) measured in
the same run. For the MMFS shapes a dense ``scaled_dot_product_attention`` over all the
same value tokens (the Flamingo-style alternative) is included. On CUDA the Triton
backend is timed too when it is registered.
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch
import torch.nn.functional as F

from mmlayers.ops import auto_backend, available_backends, multi_scale_deformable_attention

from bench._common import format_table, measure, peak_memory


def shapes_table(quick: bool, tiny: bool = False) -> dict[str, dict]:
    if tiny:  # the demo model's synchronizer calls (batch 24 / 16), at head widths 4 to 32
        out = {}
        for dh in (4, 8, 16, 32):
            out[f"tiny_llm_dh{dh}"] = dict(b=24, h=64 // dh, dh=dh, p=4, n=96,
                                           levels=[(8, 8), (4, 4), (2, 2)] * 2)
            out[f"tiny_unet_dh{dh}"] = dict(b=16, h=max(1, 32 // dh), dh=dh, p=2, n=1024,
                                            levels=[(8, 8), (4, 4), (2, 2)])
        return out
    if quick:
        return {
            "detr": dict(b=1, h=4, dh=16, levels=[(16, 16), (8, 8)], p=4, n=256),
            "mmfs4": dict(b=1, h=4, dh=16, levels=[(8, 8), (4, 4), (2, 2)] * 4, p=4, n=64),
            "unet": dict(b=1, h=4, dh=16, levels=[(16, 16), (8, 8)], p=4, n=256),
        }
    out = {"detr": dict(b=2, h=8, dh=32, levels=[(64, 64), (32, 32), (16, 16), (8, 8)], p=4,
                        n=5440)}
    for m in (1, 4, 16, 30):
        for n in (512, 2048):
            out[f"mmfs{m}" + ("" if n == 512 else "_n2048")] = dict(
                b=1, h=16, dh=64, levels=[(32, 32), (16, 16), (8, 8)] * m, p=8, n=n)
    out["unet"] = dict(b=1, h=16, dh=64, levels=[(64, 64), (32, 32), (16, 16), (8, 8)], p=8,
                       n=4096)
    return out


def make(cfg: dict, device: str, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, dh, p, n, levels = cfg["b"], cfg["h"], cfg["dh"], cfg["p"], cfg["n"], cfg["levels"]
    s = sum(hh * ww for hh, ww in levels)
    value = torch.randn(b, s, h, dh, generator=g).to(device, dtype)
    loc = torch.rand(b, n, h, len(levels), p, 2, generator=g).to(device)
    attn = torch.rand(b, n, h, len(levels), p, generator=g).softmax(-1).to(device)
    return value, loc, attn


def implementations(cfg: dict, name: str, device: str):
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        MultiScaleDeformableAttention as HFOp,
    )

    levels = cfg["levels"]
    shapes_t = torch.tensor(levels, device=device)
    hf = HFOp()
    impls = {
        "transformers": lambda v, lc, a: hf(v, shapes_t, levels, None, lc, a, 64),
        "reference": lambda v, lc, a: multi_scale_deformable_attention(
            v, levels, None, lc, a, backend="reference"),
        "torch": lambda v, lc, a: multi_scale_deformable_attention(
            v, levels, None, lc, a, backend="torch"),
    }
    if device.startswith("cuda") and "triton" in available_backends():
        impls["triton"] = lambda v, lc, a: multi_scale_deformable_attention(
            v, levels, None, lc, a, backend="triton")
    if name.startswith("mmfs"):
        def dense(v, lc, a):
            # Every query attends to every value token of every image (no sampling).
            # Queries (b, h, n, dh) derived from the locations so gradients flow to them.
            q = lc.mean((3, 4)).repeat_interleave(v.shape[-1] // 2, -1).transpose(1, 2)
            kv = v.transpose(1, 2)
            q = q.to(v.dtype)
            return F.scaled_dot_product_attention(q, kv, kv).transpose(1, 2).flatten(2)

        impls["dense_sdpa"] = dense
    return impls


def run_one(fn, value, loc, attn, device, repeats, backward: bool):
    if not backward:
        def step():
            with torch.no_grad():
                fn(value, loc, attn)
    else:
        args = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]

        def step():
            out = fn(*args)
            out.float().square().mean().backward()
            for t in args:
                t.grad = None
    seconds = measure(step, device=device, repeats=repeats)
    mem = peak_memory(step, device)
    return seconds * 1e3, mem / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the inputs")
    parser.add_argument("--quick", action="store_true", help="toy sizes")
    parser.add_argument("--tiny", action="store_true",
                        help="the demo model's synchronizer shapes at head widths 4-32 (which "
                             "backend 'auto' should pick on this device)")
    parser.add_argument("--only", nargs="*", help="shape names to run (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 avoids OpenMP spin contention on a "
                             "busy shared machine; the same setting applies to every column)")
    parser.add_argument("--max-gb", type=float, default=6.0,
                        help="skip the sample-materialising implementations (reference, "
                             "transformers) when their estimated buffers exceed this")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="implementations to leave out, e.g. reference")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, cfg in shapes_table(args.quick, args.tiny).items():
        if args.only and name not in args.only:
            continue
        value, loc, attn = make(cfg, args.device, dtype)
        results = {}
        # grid_sample paths hold ~3 copies of the (b·h, dh, n, l·p) samples in fwd+bwd.
        est_gb = 3 * cfg["b"] * cfg["h"] * cfg["dh"] * cfg["n"] * len(cfg["levels"]) * cfg["p"] \
            * value.element_size() / 2**30
        for impl, fn in implementations(cfg, name, args.device).items():
            if impl in args.skip:
                continue
            if impl in ("reference", "transformers") and est_gb > args.max_gb:
                rows.append([name, impl, f"skipped (~{est_gb:.0f} GB)", "-", "-", "-", "-", "-",
                             "-"])
                continue
            fwd_ms, fwd_mb = run_one(fn, value, loc, attn, args.device, args.repeats, False)
            fb_ms, fb_mb = run_one(fn, value, loc, attn, args.device, args.repeats, True)
            results[impl] = (fwd_ms, fwd_mb, fb_ms, fb_mb)
        if args.tiny:
            value.requires_grad_()
            picked = auto_backend(value, cfg["levels"], None, loc, attn)
            value.requires_grad_(False)
            fastest = min((k for k in results if k in ("reference", "torch")),
                          key=lambda k: results[k][2])
            rows.append([name, f"auto (fwd+bwd) picks {picked}; fastest {fastest}",
                         "-", "-", "-", "-", "-", "-", "-"])
        base = results.get("transformers")
        for impl, (fwd_ms, fwd_mb, fb_ms, fb_mb) in results.items():
            ratio_f = f"{base[0] / fwd_ms:.2f}x" if base else "-"
            ratio_fb = f"{base[2] / fb_ms:.2f}x" if base else "-"
            mem_ratio = f"{fb_mb / base[3]:.2f}" if base and base[3] else "-"
            rows.append([name, impl, fwd_ms, ratio_f, fb_ms, ratio_fb, fwd_mb, fb_mb, mem_ratio])
    header = ["shape", "impl", "fwd ms", "speed-up fwd", "fwd+bwd ms", "speed-up fwd+bwd",
              "fwd peak MiB", "fwd+bwd peak MiB", "peak mem / transformers"]
    print(f"# ops benchmark {datetime.date.today()} · {platform.processor() or platform.machine()}"
          f" · torch {torch.__version__} · threads {torch.get_num_threads()} · device "
          f"{args.device} · {args.dtype}")
    print(format_table(header, rows))


if __name__ == "__main__":
    main()
