"""Triton deformable-attention kernels vs the grid_sample reference (and optionally torch).

``python recipes/benchmark.py triton_ops --device cuda [--sweep] [--backends ...]``
``python recipes/benchmark.py triton_ops --device cpu --quick`` (toy sizes, interpreter)

Shapes: the Deformable-DETR encoder; the MMFS LLM layer (m images × levels 32², 16², 8²
as one level axis, n = 512 and 2048, with and without a causal image visibility); the
UNet MMFS layer; and the synchronizer at initialisation, where every query samples the
same points (the backward atomics' worst case). For each: forward and forward+backward
milliseconds in fp32 and bf16 (values and weights in that dtype, locations fp32), and the
fraction of a bandwidth bound: bytes the kernels request (every gathered corner row,
locations, weights, output; backward adds the re-read rows, fp32 atomic read-modify-writes
and the gradients), as if nothing were cached, divided by the time, over the device's
measured copy bandwidth. Cached gathers can push it above 1. A correctness table compares
triton with the reference on the same device (output and all three gradients, max error
relative to the reference's largest magnitude) and a check runs the triton launch under
``torch.cuda.set_sync_debug_mode("error")`` to show it does not sync the host.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mmlayers.ops import multi_scale_deformable_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import format_table, measure  # noqa: E402

__all__ = ["main"]

DETR = ((64, 64), (32, 32), (16, 16), (8, 8))
MMFS = ((32, 32), (16, 16), (8, 8))
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case:
    name: str
    b: int
    h: int
    dh: int
    p: int
    shapes: tuple[tuple[int, int], ...]
    n: int
    images: int = 1  # level groups, for the visibility variant
    identical: bool = False  # every query samples the same points
    causal: bool = False  # query i sees the images that start at or before it


def _cases(quick: bool) -> list[Case]:
    if quick:
        toy = ((6, 8), (3, 4), (1, 1))
        return [Case("detr-toy", 1, 2, 8, 2, toy, 24),
                Case("mmfs-toy m=2", 1, 2, 6, 2, toy * 2, 20, images=2),
                Case("mmfs-toy m=2 causal", 1, 2, 6, 2, toy * 2, 20, images=2, causal=True),
                Case("sync-init-toy", 1, 2, 6, 2, toy * 2, 20, images=2, identical=True)]
    cases = [Case("detr-encoder", 2, 8, 32, 4, DETR, 5440)]
    for n in (512, 2048):
        for m in (1, 4, 16, 30):
            cases.append(Case(f"mmfs n={n} m={m}", 1, 16, 64, 8, MMFS * m, n, images=m))
        cases.append(Case(f"mmfs n={n} m=30 causal", 1, 16, 64, 8, MMFS * 30, n, 30,
                          causal=True))
    cases.append(Case("unet", 1, 16, 64, 8, DETR, 4096))
    cases.append(Case("sync-init n=2048 m=30", 1, 16, 64, 8, MMFS * 30, 2048, 30,
                      identical=True))
    return cases


def _inputs(c: Case, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    s, n_lv = sum(hh * ww for hh, ww in c.shapes), len(c.shapes)
    value = torch.randn(c.b, s, c.h, c.dh, generator=g, device=device).to(dtype)
    q = 1 if c.identical else c.n
    loc = torch.rand(c.b, q, c.h, n_lv, c.p, 2, generator=g, device=device) * 1.2 - 0.1
    loc = loc.expand(c.b, c.n, c.h, n_lv, c.p, 2).contiguous()
    attn = torch.rand(c.b, c.n, c.h, n_lv, c.p, generator=g, device=device)
    grad = torch.randn(c.b, c.n, c.h * c.dh, generator=g, device=device).to(dtype)
    vis = mask = None
    if c.causal:  # images spread evenly over the tokens, each seen from its start on
        first = torch.arange(c.images, device=device) * c.n // c.images
        vis = (torch.arange(c.n, device=device)[:, None] >= first).expand(c.b, c.n, c.images)
        per = n_lv // c.images
        mask = vis.repeat_interleave(per, dim=-1)[:, :, None, :, None]
        attn = attn * mask  # the reference sees the same zero weights
    attn = (attn / attn.sum((-1, -2), keepdim=True).clamp_min(1e-6)).to(dtype)
    return value, loc, attn, grad, vis, mask


def _op(backend: str, c: Case, vis):
    if backend == "triton" and vis is not None:
        from mmlayers.ops._triton import triton_deformable_attention

        return lambda v, lo, a: triton_deformable_attention(v, c.shapes, None, lo, a,
                                                            visibility=vis)
    return lambda v, lo, a: multi_scale_deformable_attention(v, c.shapes, None, lo, a,
                                                             backend=backend)


def _fwd_bwd(fn, value, loc, attn, grad):
    args = [t.detach().requires_grad_() for t in (value, loc, attn)]
    out = fn(*args)
    return (out, *torch.autograd.grad(out, args, grad))


def _bytes(c: Case, dtype: torch.dtype, backward: bool) -> float:
    ev = torch.finfo(dtype).bits // 8
    samples = c.b * c.n * c.h * len(c.shapes) * c.p
    if c.causal:  # skipped (block, image) pairs are not read; count what a query sees
        samples = samples * (c.images + 1) / (2 * c.images)
    out = c.b * c.n * c.h * c.dh * ev
    fwd = samples * (4 * c.dh * ev + 2 * 4 + ev) + out
    if not backward:
        return fwd
    s = sum(hh * ww for hh, ww in c.shapes)
    bwd = samples * (4 * c.dh * ev + 4 * c.dh * 4 * 2 + 2 * 4 * 2 + 2 * ev) + out
    return fwd + bwd + c.b * s * c.h * c.dh * (4 + ev)  # zeroed workspace, cast once


def _copy_bandwidth(device: str) -> float:
    """Measured device-to-device copy bandwidth, bytes/s (read + write)."""
    src = torch.empty(2**28 if device.startswith("cuda") else 2**24, dtype=torch.uint8,
                      device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=device, repeats=5)
    return 2 * src.numel() / t


def _rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().float(), y.detach().float()
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))


def _correctness(c: Case, dtype, device) -> list[object]:
    value, loc, attn, grad, vis, mask = _inputs(c, dtype, device, seed=1)
    got = _fwd_bwd(_op("triton", c, vis), value, loc, attn, grad)
    # Oracle: the reference in fp32 on the same rounded inputs; weights of images a
    # query cannot see are zero there and have zero gradient in triton.
    want = _fwd_bwd(_op("reference", c, None), value.float(), loc, attn.float(), grad.float())
    if mask is not None:
        want = (*want[:3], want[3] * mask)
    errs = [_rel_err(x, y) for x, y in zip(got, want, strict=True)]
    return [c.name, str(dtype).removeprefix("torch."), *errs,
            "ok" if max(errs) < TOL[dtype] else "FAIL"]


def _no_sync(c: Case, device: str) -> str:
    value, loc, attn, grad, vis, _ = _inputs(c, torch.bfloat16, device)
    fn = _op("triton", c, vis)
    _fwd_bwd(fn, value, loc, attn, grad)  # warm: compile, cache the level table
    torch.cuda.synchronize()
    args = [t.detach().requires_grad_() for t in (value, loc, attn)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fn(*args)
        torch.autograd.grad(out, args, grad)
        return "no host sync in forward + backward"
    except RuntimeError as e:
        return f"HOST SYNC: {e}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _time(fn, value, loc, attn, grad, device, repeats) -> tuple[float, float]:
    """(forward, forward + backward) median seconds."""
    with torch.no_grad():
        t_f = measure(lambda: fn(value, loc, attn), device=device, repeats=repeats)
    t_fb = measure(lambda: _fwd_bwd(fn, value, loc, attn, grad), device=device,
                   repeats=repeats)
    return t_f, t_fb


def _timings(cases, backends, dtypes, device, repeats, bw) -> list[list[object]]:
    rows = []
    for c in cases:
        for dtype in dtypes:
            value, loc, attn, grad, vis, _ = _inputs(c, dtype, device)
            base = {}
            for backend in backends:
                t_f, t_fb = _time(_op(backend, c, vis), value, loc, attn, grad, device,
                                  repeats)
                base.setdefault("f", t_f)
                base.setdefault("fb", t_fb)
                rows.append([c.name, str(dtype).removeprefix("torch."), backend,
                             t_f * 1e3, t_fb * 1e3,
                             _bytes(c, dtype, False) / t_f / bw,
                             _bytes(c, dtype, True) / t_fb / bw,
                             base["f"] / t_f, base["fb"] / t_fb])
    return rows


def _sweep(cases, device, repeats) -> list[list[object]]:
    from mmlayers.ops._triton import KERNEL_CONFIG

    default = replace(KERNEL_CONFIG)
    variants = [(512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8)]
    rows = []
    try:
        for c in cases:
            value, loc, attn, grad, vis, _ = _inputs(c, torch.bfloat16, device)
            fn = _op("triton", c, vis)
            for tile, warps in variants:
                for field in ("fwd", "bwd"):
                    setattr(KERNEL_CONFIG, f"{field}_tile", tile)
                    setattr(KERNEL_CONFIG, f"{field}_warps", warps)
                t_f, t_fb = _time(fn, value, loc, attn, grad, device, repeats)
                rows.append([c.name, tile, warps, t_f * 1e3, (t_fb - t_f) * 1e3])
    finally:
        for field, val in vars(default).items():
            setattr(KERNEL_CONFIG, field, val)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py triton_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu runs the kernels in the Triton interpreter (toy sizes)")
    parser.add_argument("--quick", action="store_true", help="toy sizes (CPU interpreter)")
    parser.add_argument("--backends", default="reference,triton",
                        help="comma-separated; the first is the speed-up baseline")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs (default 10 on cuda, 1 on cpu)")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="override the measured copy bandwidth (GB/s)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time KernelConfig tile/warp variants (bf16)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        # The interpreter mode is fixed when triton is first imported: set it now.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --quick)")
    from mmlayers.ops._triton import _device_reasons

    why = _device_reasons(torch.device(args.device))
    if why:
        raise SystemExit(f"triton backend unavailable: {why[0]}")
    cases = _cases(args.quick or args.device == "cpu")
    repeats = args.repeats or (1 if args.device == "cpu" else 10)
    dtypes = [torch.float32, torch.bfloat16]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    bw = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else _copy_bandwidth(args.device)
    print(f"# triton_ops on {name}; torch {torch.__version__}; bound bandwidth "
          f"{bw / 1e9:.0f} GB/s ({'given' if args.bandwidth_gbs else 'measured copy'})\n")
    rows = [_correctness(c, dt, args.device) for c in cases for dt in dtypes]
    print("## correctness vs reference (max |err| / max |ref|)\n")
    print(format_table(["case", "dtype", "out", "grad value", "grad loc", "grad attn", ""],
                       rows))
    if args.device == "cuda":
        print(f"\n{_no_sync(cases[1], args.device)}")
    backends = args.backends.split(",")
    print("\n## time (ms), fraction of the bandwidth bound, speed-up vs "
          f"{backends[0]}\n")
    print(format_table(["case", "dtype", "backend", "fwd ms", "fwd+bwd ms", "fwd bw frac",
                        "f+b bw frac", "fwd x", "f+b x"],
                       _timings(cases, backends, dtypes, args.device, repeats, bw)))
    if args.sweep:
        pick = [c for c in cases if c.name in ("detr-encoder", "mmfs n=2048 m=16",
                                               "sync-init n=2048 m=30")] or cases[:1]
        print("\n## KernelConfig sweep (bf16; same tile and warps for forward and backward)\n")
        print(format_table(["case", "tile", "warps", "fwd ms", "bwd ms"],
                           _sweep(pick, args.device, repeats)))
    if any(r[-1] == "FAIL" for r in rows):
        raise SystemExit("correctness FAILED (see the table above)")


if __name__ == "__main__":
    main()
