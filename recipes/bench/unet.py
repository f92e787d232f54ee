"""Synchronized UNet: cost per denoising step, and generation with a pipeline built once.

``python recipes/benchmark.py unet [--quick] [--threads 1] [--size 32] [--batch 2]``

Part 1, one denoising step (a UNet forward, ``torch.no_grad``; and forward + backward as
in training) of a tiny SD-shaped ``UNet2DConditionModel`` (3 down blocks, 2 layers each,
latent ``--size``², 9 skip tensors + mid) conditioned on a 77-token context:

- ``bare``: the UNet alone (the reference);
- ``+ synchronizers``: :class:`mmlayers.adapters.diffusion.UNetSynchronizer` attached, one
  deformable block per skip tensor and the mid block, reading a 4-level pyramid
  (``size``, ``size``/2, ``size``/4, ``size``/8 as the paper's 64…8 at latent 64);
- ``+ dense cross-attention``: the same hooks with every block replaced by dense
  multi-head cross-attention from every pixel to every token of the previous image's
  pyramid (SDPA), same widths.

Part 2, generation (DDPM, ``--steps`` steps, guidance 7.5, batch ``--batch``, tiny VAE):

- ``ImageGenerator (built once)``: :class:`mmlayers.adapters.diffusion.ImageGenerator`
  created once, only the denoising loop and the VAE decode per call (the reference);
- ``StableDiffusionPipeline (built once)``: the stock pipeline, reused, given
  ``prompt_embeds``/``negative_prompt_embeds`` inside ``sync.condition``;
- ``... rebuilt per call (official)``: ``StableDiffusionPipeline.from_pretrained`` of the
  saved tiny components (VAE, CLIP text encoder, tokenizer, scheduler; our UNet passed in)
  on every call, as the official ``generate_images`` does.

Part 3, one block at the paper's largest geometry (``--block-size``, default 64: query map
64² × 320 channels, pyramid 64², 32², 16², 8² × 1024, width 1024, 16 heads, 8 points;
batch 1, forward, values projected once as during generation): the deformable
``SkipSynchronizer`` vs the dense block; reference = deformable. ``--block-size 0`` skips
it.

Rows are the best of ``--rounds`` interleaved rounds of a median of ``--repeats`` runs.
Ratios use process CPU time (robust to other jobs on a shared machine when run with
``--threads 1``); wall times are shown too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from bench._common import format_table

__all__ = ["main"]


class DenseSkipBlock(nn.Module):
    """Dense cross-attention twin of ``SkipSynchronizer``: every pixel attends to every
    pyramid token (all levels), ``heads`` heads of width ``dim / heads``."""

    def __init__(self, *, channels: int, value_dim: int, dim: int, heads: int,
                 grid_size: tuple[int, int]) -> None:
        super().__init__()
        from mmlayers.layers.posembed import sincos_2d

        self.channels, self.heads, self.grid = channels, heads, grid_size
        self.sincos_2d = sincos_2d
        self.query_norm = nn.LayerNorm(channels, eps=1e-6)
        self.value_norm = nn.LayerNorm(value_dim, eps=1e-6)
        self.q = nn.Linear(channels, dim)
        self.kv = nn.Linear(value_dim, 2 * dim)
        self.out = nn.Linear(dim, channels)
        self.conv = nn.Conv2d(channels, channels, 1)

    def project_values(self, pyramid: torch.Tensor) -> torch.Tensor:
        return self.kv(self.value_norm(pyramid))

    def forward(self, x, values, has_image):
        b, c, h, w = x.shape
        pos = self.sincos_2d(h, w, c, base_size=self.grid)
        q = self.q(self.query_norm(rearrange(x, "b c H W -> b (H W) c")) + pos)
        q = rearrange(q, "b n (h dh) -> b h n dh", h=self.heads)
        k, v = rearrange(values[:, 0], "b s (two h dh) -> two b h s dh", two=2, h=self.heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n dh -> b n (h dh)")
        out = self.out(out) * has_image[:, None, None]
        return self.conv(rearrange(out, "b (H W) c -> b c H W", H=h))


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def _tiny_pipeline_dir(root: Path, unet, vae, scheduler) -> Path:
    """Save a StableDiffusionPipeline of tiny components (CLIP text encoder, a 6-token
    tokenizer) so that it can be re-loaded with ``from_pretrained`` as the official code
    does; the UNet is passed in at load time."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "a</w>", "b</w>",
                                         "c</w>", "!</w>"])}
    (root / "tok").mkdir()
    (root / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=unet.config.
                                        cross_attention_dim, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=77))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py unet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="latent 16, 3 steps, 1 round")
    parser.add_argument("--size", type=int, default=32, help="latent side (paper: 64)")
    parser.add_argument("--batch", type=int, default=2, help="images per step / call")
    parser.add_argument("--steps", type=int, default=5, help="denoising steps (paper: 30)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per round (median)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (min)")
    parser.add_argument("--block-size", type=int, default=64,
                        help="part 3 query-map side (paper 64; 0 = skip)")
    parser.add_argument("--backend", default=None, help="deformable-attention backend")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.rounds, args.repeats = 16, 3, 1, 2
        args.block_size = min(args.block_size, 16)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    from mmlayers.adapters.diffusion import ImageGenerator, UNetSynchronizer

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    torch.manual_seed(0)
    size, b, width = args.size, args.batch, 64
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=width,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2).eval()
    levels = tuple(max(1, size >> k) for k in range(4))
    skw = dict(value_dim=width, dim=width, heads=4, points=8, level_sizes=levels,
               backend=args.backend)
    sync = UNetSynchronizer.for_unet(unet, **skw)
    dense = UNetSynchronizer.for_unet(unet, **skw)
    for i, blk in enumerate([*dense.down, dense.mid]):
        new = DenseSkipBlock(channels=blk.channels, value_dim=width, dim=width, heads=4,
                             grid_size=(size, size))
        if i < len(dense.down):
            dense.down[i] = new
        else:
            dense.mid = new
    for s in (sync, dense):  # non-zero output convs: no shortcut anywhere
        for blk in [*s.down, s.mid]:
            nn.init.normal_(blk.conv.weight, std=0.02)
    x = torch.randn(b, 4, size, size)
    t = torch.full((b,), 500)
    ctx, neg = torch.randn(b, 77, width), torch.randn(1, 77, width)
    pyr = torch.randn(b, sum(v * v for v in levels), width)

    def step(s, train):
        def fn():
            with torch.set_grad_enabled(train), (s.condition(pyr) if s else contextlib.nullcontext()):
                out = unet(x, t, encoder_hidden_states=ctx).sample
                if train:
                    out.square().mean().backward()
        return fn

    sched = DDPMScheduler(steps_offset=1, clip_sample=False)  # what the pipeline expects
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2).eval()
    tmp = tempfile.TemporaryDirectory()
    path = _tiny_pipeline_dir(Path(tmp.name), unet, vae, sched)
    gen_kw = dict(num_inference_steps=args.steps, guidance_scale=7.5)

    def ours():
        gen(ctx, negative_hidden_states=neg, pyramid=pyr, generator=_seed(), **gen_kw)

    def stock(pipe_fn):
        def fn():
            pipe = pipe_fn()
            with torch.no_grad(), sync.condition(pyr):
                lat = pipe(prompt_embeds=ctx, negative_prompt_embeds=neg.expand_as(ctx),
                           height=size * 2, width=size * 2, output_type="latent",
                           generator=_seed(), **gen_kw).images
                (pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample / 2
                 + 0.5).clamp(0, 1)
        return fn

    def rebuilt():
        return StableDiffusionPipeline.from_pretrained(
            path, unet=unet, scheduler=DDPMScheduler.from_config(sched.config),
            safety_checker=None)

    once = rebuilt()
    once.set_progress_bar_config(disable=True)

    def reused():
        return once

    def fresh():
        p = rebuilt()
        p.set_progress_bar_config(disable=True)
        return p

    step_cases = {}
    for train in (False, True):
        tag = "fwd+bwd" if train else "fwd"
        step_cases[f"step {tag}: bare UNet"] = (None, step(None, train))
        step_cases[f"step {tag}: + synchronizers (deformable)"] = (sync, step(sync, train))
        step_cases[f"step {tag}: + dense cross-attention"] = (dense, step(dense, train))
    gen_cases = {"generate: ImageGenerator (built once)": ours,
                 "generate: pipeline rebuild alone (from_pretrained)": rebuilt,
                 "generate: StableDiffusionPipeline (built once)": stock(reused),
                 "generate: StableDiffusionPipeline rebuilt per call (official)": stock(fresh)}
    wall = dict.fromkeys([*step_cases, *gen_cases], float("inf"))
    cpu = dict(wall)
    for _ in range(args.rounds):
        for name, (s, fn) in step_cases.items():
            if s is not None:
                s.attach(unet)
            try:
                w, c = _time(fn, args.repeats)
                wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
            finally:
                if s is not None:
                    s.remove()
        sync.attach(unet)
        gen = ImageGenerator(unet=unet, scheduler=sched, vae=vae, synchronizer=sync)
        for name, fn in gen_cases.items():
            w, c = _time(fn, args.repeats)
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
        sync.remove()
    tmp.cleanup()
    if args.block_size:
        _paper_block(args, wall, cpu)
    rows = []
    for name in wall:
        ref = (f"step {name.split(':')[0].split()[1]}: bare UNet" if name.startswith("step")
               else "generate: ImageGenerator (built once)" if name.startswith("generate")
               else "block: deformable SkipSynchronizer")
        extra = (f"{b / cpu[name]:.2f}" if name.startswith("generate")
                 and "alone" not in name else "—")
        rows.append([name, wall[name] * 1e3, cpu[name] * 1e3, extra, cpu[name] / cpu[ref]])
    print(f"UNet synchronizers on CPU ({date.today()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads): UNet2DConditionModel (32, 64, 64) × 2 layers, "
          f"latent {size}², batch {b}, context 77 × {width}; pyramid levels {levels} × {width}; "
          f"synchronizer dim {width}, 4 heads, 8 points; generation DDPM {args.steps} steps, "
          f"CFG 7.5, tiny VAE ({size * 2} px)")
    print(format_table(["case", "wall ms", "CPU ms", "images/s (CPU)", "× reference (CPU)"],
                       rows))


def _paper_block(args, wall, cpu) -> None:
    """Part 3 (module docstring): one block, deformable vs dense, at the paper geometry."""
    from mmlayers.adapters.skip_sync import SkipSynchronizer

    side, ch, dv = args.block_size, 320, 1024
    levels = tuple(max(1, side >> k) for k in range(4))
    deform = SkipSynchronizer(channels=ch, value_dim=dv, size=side, grid_size=(side, side),
                              dim=1024, heads=16, points=8, level_sizes=levels,
                              backend=args.backend).eval()
    dense = DenseSkipBlock(channels=ch, value_dim=dv, dim=1024, heads=16,
                           grid_size=(side, side)).eval()
    x = torch.randn(1, ch, side, side)
    pyr = torch.randn(1, 1, sum(v * v for v in levels), dv)
    has = torch.ones(1, dtype=torch.bool)
    with torch.no_grad():
        vd, vs = deform.project_values(pyr), dense.project_values(pyr)
        for name, fn in (("block: deformable SkipSynchronizer", lambda: deform(x, vd, has)),
                         ("block: dense cross-attention", lambda: dense(x, vs, has))):
            w, c = _time(fn, args.repeats)
            wall[name], cpu[name] = w, c
    print(f"part 3 geometry: query map {side}² × {ch}, pyramid {levels} × {dv}, width 1024, "
          f"16 heads, 8 points, batch 1")


def _seed():
    return torch.Generator().manual_seed(0)
