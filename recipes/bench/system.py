"""The whole MM-Interleaved system: training step, synchronizer variants, inference, MFU.

    python recipes/benchmark.py system --preset {paper_13b --device cuda,tiny} [--json out.json]

``paper_13b``: :meth:`MMInterleavedConfig.paper_13b_shapes`, random weights, bf16 on CUDA,
batch 1 × 2048 tokens; ``tiny``: the demo model, fp32 on CPU, 256 tokens. Both with the
paper's freezing (LLM, ViT, VAE) and gradient checkpointing (LLM layers, UNet blocks,
adapter interaction blocks); AdamW over the parameter groups. See docs/benchmarks_system.md.

Training step (forward + backward + AdamW) with 8 and 16 images per sequence, four
variants built in place, measured in the same run:

- ``mmlayers``: the library's synchronizers, op backend ``auto``;
- ``mmlayers, grid_sample op``: the same with the ``reference`` (grid_sample) backend;
- ``official, grid_sample op``: the LLM synchronizers computed in the official order
  (query repeated per image, every image sampled: ``bench.sync.OfficialFormulation``) and
  every synchronizer on the grid_sample backend (the UNet's read one image, where both
  orders are the same computation);
- ``no synchronizers``: the LLM synchronizer hooks removed, the UNet ones idle (no image
  has a previous image and ``no_image="zero"``: the blocks are skipped).

Shares (``torch.profiler``: forward ranges from module hooks, backward ops to the range of
the forward op that made them), MFU (model FLOPs without recomputation / step time / bf16
peak), time to first token with 8 images, cached decoding, one image with guidance.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone

import torch

from bench import _system_util as su
from bench._common import format_table, measure
from bench._system_infer import inference, peak_gib, peak_reset

__all__ = ["main"]

PRESETS = {
    "tiny": dict(tokens=256, images=[8, 16], repeats=2, warmup=1, decode=8, gen_steps=4,
                 guidance=2.0, profile="all"),
    "paper_13b": dict(tokens=2048, images=[8, 16], repeats=3, warmup=2, decode=32,
                      gen_steps=30, guidance=7.5, profile="largest"),
}
VARIANTS = ("mmlayers", "mmlayers, grid_sample op", "official, grid_sample op",
            "no synchronizers")


_T0 = time.perf_counter()


def progress(what: str) -> None:
    sys.stderr.write(f"[system {time.perf_counter() - _T0:7.1f} s] {what}\n")


def build(preset: str, device: str, dtype: torch.dtype):
    from mmlayers.models import MMInterleaved, MMInterleavedConfig

    if preset == "paper_13b":
        cfg = MMInterleavedConfig.paper_13b_shapes()
    else:
        cfg = MMInterleavedConfig.tiny(vocab_size=64)
        cfg.llm.freeze = cfg.vision.freeze = True   # the paper's freezing
        cfg.llm.max_images = 50
    cfg.llm.gradient_checkpointing = True   # the model re-opens the images when recomputing
    torch.manual_seed(0)
    default, _ = torch.get_default_dtype(), torch.set_default_dtype(dtype)
    try:  # built in the run's dtype: no fp32 copy (52 GB for the 13B LLM) on the GPU
        with torch.device(device):
            model = MMInterleaved.from_config(cfg).to(dtype)
    finally:
        torch.set_default_dtype(default)
    model.unet.enable_gradient_checkpointing()
    if hasattr(model.visual.pyramid, "set_grad_checkpointing"):
        model.visual.pyramid.set_grad_checkpointing(True)
    return model.train()


def train_step(model, batch):
    """(step, optimizer step): forward + backward inside the kept vision context."""
    groups = model.parameter_groups()
    for g in groups:
        g.pop("names")
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.995), eps=1e-6)

    def fwd_bwd():
        model(batch, generator=torch.Generator().manual_seed(0)).loss.backward()

    def opt_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step():
        fwd_bwd()
        opt_step()
    return step, fwd_bwd, opt_step, opt


def measure_step(model, batch, variant: str, m: int, args, dev: str, peak) -> dict:
    """Time, peak memory, shares (profiled variants) and model FLOPs of one step."""
    step, fwd_bwd, opt_step, opt = train_step(model, batch)
    for _ in range(args.warmup):
        step()  # warm-up (allocates the optimizer state, compiles kernels)
    peak_reset(dev)
    sec = measure(step, device=dev, repeats=args.repeats, warmup=0)
    mem = peak_gib(dev)
    shares = None
    profiled = {"all": True, "largest": m == max(args.images), "none": False}[args.profile]
    if profiled and variant in ("mmlayers", "official, grid_sample op"):
        shares = su.part_shares(model, fwd_bwd, opt_step, dev)
    flops = None
    if variant == "mmlayers":
        with su.ModelFlops() as counter:
            fwd_bwd()
        opt.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
    return {"variant": variant, "images": m, "tokens": args.tokens, "s_per_step": sec,
            "tokens_per_s": args.tokens / sec, "images_per_s": m / sec, "peak_gib": mem,
            "shares": shares, "model_tflop": flops and flops / 1e12,
            "mfu": (flops / sec / (peak * 1e12)) if flops and peak else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmark.py system", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="model shapes and run settings (see docs/benchmarks_system.md)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--tokens", type=int, help="sequence length (preset's default)")
    parser.add_argument("--images", type=int, nargs="+", help="images per sequence")
    parser.add_argument("--repeats", type=int, help="timed repeats (median)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them")
    parser.add_argument("--decode", type=int, help="cached decoding steps")
    parser.add_argument("--gen-steps", type=int, help="denoising steps per image")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="training variants to time (default: all)")
    parser.add_argument("--profile", choices=["all", "largest", "none"],
                        help="which image counts get a profiled step for the time shares "
                             "(preset default: all for tiny, the largest for paper_13b)")
    parser.add_argument("--peak-tflops", type=float, help="override the bf16 peak table")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--json", help="write the report here (through recipes/benchmark.py, "
                        "whose --json records the table, it lands under \"details\")")
    args = parser.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    cuda = dev.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if cuda:
        torch.cuda.set_device(torch.device(dev))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if cuda else torch.float32)
    t0 = time.perf_counter()
    model = build(args.preset, dev, dtype)
    build_s = time.perf_counter() - t0
    from mmlayers.models import parameter_report

    params = parameter_report(model)
    name = torch.cuda.get_device_name(dev) if cuda else (platform.processor() or "cpu")
    peak = args.peak_tflops or (su.peak_bf16_tflops(name) if cuda and dtype == torch.bfloat16
                                else None)
    progress(f"built in {build_s:.1f} s; inference")
    rows, results, errors, infer = [], [], [], None
    try:
        infer = inference(model, args, dev)
    except (RuntimeError, ValueError) as err:   # e.g. out of memory: keep going
        errors.append(f"inference: {type(err).__name__}: {err}")
        progress(errors[-1][:300])
    batches = {m: su.synthetic_batch(model, tokens=args.tokens, images=m,
                                     image_size=model.config.decoder.image_size).to(dev)
               for m in args.images}
    for variant in VARIANTS:
        if variant not in args.variants:
            continue
        if variant == "mmlayers, grid_sample op":
            su.set_sync_backend(model, "reference")
        elif variant == "official, grid_sample op":
            su.use_official(model, "reference")
            su.set_sync_backend(model, "reference")
        elif variant == "no synchronizers":
            # LLM hooks off; UNet blocks idle (no previous image, no_image="zero": skipped)
            model.sync_handle.remove()
            model.unet_sync.no_image = "zero"
            for b in batches.values():
                b.image_previous.fill_(-1)
        for m, batch in batches.items():
            progress(f"train: {variant}, {m} images")
            try:
                results.append(measure_step(model, batch, variant, m, args, dev, peak))
            except (RuntimeError, ValueError) as err:   # e.g. out of memory: keep going
                errors.append(f"train {variant}, {m} images: {type(err).__name__}: {err}")
                progress(errors[-1][:300])
            model.zero_grad(set_to_none=True)
    by = {(r["variant"], r["images"]): r["s_per_step"] for r in results}
    ratios = {}
    for m in args.images:
        ours, none = by.get(("mmlayers", m)), by.get(("no synchronizers", m))
        off, grid = by.get(("official, grid_sample op", m)), by.get(("mmlayers, grid_sample op", m))
        r = {}
        if ours and none:
            r["step_vs_no_sync"] = ours / none
        if ours and off:
            r["official_step_vs_ours"] = off / ours
        if ours and grid:
            r["grid_sample_step_vs_ours"] = grid / ours
        if ours and off and none and ours > none and off > none:
            r["sync_part_official_vs_ours"] = (off - none) / (ours - none)
        sh = {v: next((x["shares"] for x in results if x["variant"] == v and x["images"] == m
                       and x["shares"]), None) for v in ("mmlayers", "official, grid_sample op")}
        if all(sh.values()) and ours and off:
            mine = sh["mmlayers"]["synchronizers"] * ours
            r["sync_part_official_vs_ours_profiled"] = (
                sh["official, grid_sample op"]["synchronizers"] * off / mine if mine else None)
        ratios[str(m)] = r
    for r in results:
        s = r["shares"] or {}
        ref = by.get(("mmlayers", r["images"]))
        rows.append([f"train: {r['variant']}", r["images"], r["s_per_step"], r["tokens_per_s"],
                     r["images_per_s"], r["peak_gib"], (r["s_per_step"] / ref) if ref else "",
                     *[f"{100 * s[k]:.0f}" if s else "" for k in
                       ("vision", "llm", "synchronizers", "unet")],
                     f"{100 * r['mfu']:.1f}%" if r["mfu"] else ("n/a" if r["model_tflop"] else "")])
    if infer:
        blank = [""] * 7
        rows += [["infer: time to first token", 8, infer["ttft_s"],
                  infer["prompt_tokens"] / infer["ttft_s"], "", *blank],
                 [f"infer: cached decoding ({infer['decode_tokens']} tok)", 8,
                  1 / infer["decode_tokens_per_s"], infer["decode_tokens_per_s"], "", *blank],
                 [f"infer: image ({infer['image_steps']} steps, CFG {infer['guidance']})", 1,
                  infer["s_per_image"], "", 1 / infer["s_per_image"], *blank]]
    header = ["what", "images", "s", "tokens/s", "images/s", "peak GiB", "vs mmlayers",
              "vision %", "LLM %", "sync %", "UNet %", "MFU"]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": dev, "device_name": name, "peak_bf16_tflops": peak,
        "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "settings": {"preset": args.preset, "dtype": str(dtype).replace("torch.", ""),
                     "tokens": args.tokens, "images": args.images, "repeats": args.repeats,
                     "warmup": args.warmup, "variants": args.variants, "profile": args.profile,
                     "decode": args.decode, "gen_steps": args.gen_steps,
                     "guidance": args.guidance,
                     "threads": torch.get_num_threads(), "gradient_checkpointing": True,
                     "optimizer": "AdamW(0.9, 0.995), model.parameter_groups()",
                     "build_s": build_s},
        "parameters": params, "train": results, "ratios": ratios, "inference": infer,
        "errors": errors}
    sys.stdout.write(f"system suite, preset {args.preset}, {name}, {report['settings']['dtype']}"
                     f", torch {torch.__version__}, triton {triton_version}, "
                     f"{report['date']}\n")
    sys.stdout.write(format_table(header, rows) + "\n")
    big = str(max(args.images))
    r = ratios.get(big, {})
    sys.stdout.write(f"ratios: {json.dumps(ratios)}\n"
                     f"targets at {big} images: step / no-sync step = "
                     f"{r.get('step_vs_no_sync', float('nan')):.2f} (target <= 1.3); "
                     f"synchronizer time, official + grid_sample / mmlayers = "
                     f"{r.get('sync_part_official_vs_ours_profiled') or float('nan'):.1f}x "
                     f"profiled, {r.get('sync_part_official_vs_ours', float('nan')):.1f}x "
                     f"from step differences (target >= 5)\n")
    for e in errors:
        sys.stdout.write(f"error: {e[:500]}\n")
    save(report, args.json)
    return report


def save(report: dict, path: str | None) -> None:
    """Write the report to ``path``; under ``benchmark.py --json PATH`` (which takes the
    option and records the table) also add it to that record as ``"details"``."""
    from bench import _common

    record = getattr(_common, "_json", None)
    if record is not None:
        record["record"]["details"] = report
        with open(record["path"], "w") as f:
            json.dump(record["record"], f, indent=1, ensure_ascii=False)
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
