"""Can the demo's image decoder learn the shapes task without the LLM? (text → image only)

    python recipes/decoder_experiments.py --cond oracle     # learned attribute embeddings
    python recipes/decoder_experiments.py --cond caption    # fixed random word embeddings

Builds the image decoder of ``recipes/configs/shapes_tiny.yaml`` (UNet, context encoder,
scheduler, sampler; the UNet synchronizers see no image) and trains it on
``caption_image`` documents with the same diffusion loss as the whole model, conditioned on

- ``oracle``: one learned embedding per colour, shape, position and size (4 tokens);
- ``caption``: the caption's words through a fixed (frozen) random embedding table.

Then generates one image per held-out caption and scores it from its pixels, as the demo
does. The full path (LLM hidden states → context encoder → UNet) is ``recipes/demo.py``.
Prints one JSON line of scores and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train as train_recipe  # noqa: E402
from _report import score_generated  # noqa: E402

from mmlayers.adapters.diffusion_objective import diffusion_loss  # noqa: E402
from mmlayers.adapters.diffusion_sampling import ImageGenerator  # noqa: E402
from mmlayers.data import POSITIONS, SHAPES, SIZES, ShapesCorpus  # noqa: E402
from mmlayers.models import builders  # noqa: E402

logger = logging.getLogger("decoder_experiments")


class OracleCondition(nn.Module):
    """(colour, shape, position, size) indices (b, 4) → (b, 4, d) learned tokens."""

    def __init__(self, colors: int, dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(k, dim)
                                    for k in (colors, len(SHAPES), len(POSITIONS), len(SIZES)))

    def forward(self, attrs: torch.Tensor) -> torch.Tensor:
        return torch.stack([t(attrs[:, i]) for i, t in enumerate(self.tables)], 1)


def _conditions(docs, mode: str, colors, tokenizer, table: nn.Module):
    """(b, s, d) context in sequence order and its (b, s) padding mask."""
    if mode == "oracle":
        a = [d.meta["images"][0][0] for d in docs]
        idx = torch.tensor([[colors.index(x.color), SHAPES.index(x.shape),
                             POSITIONS.index(x.position), SIZES.index(x.size)] for x in a])
        ctx = table(idx)
        return ctx, torch.zeros(ctx.shape[:2], dtype=torch.bool)
    ids = [tokenizer(d.items[0], add_special_tokens=False)["input_ids"] for d in docs]
    s = max(map(len, ids))
    pad = torch.tensor([[j >= len(r) for j in range(s)] for r in ids])
    ids = torch.tensor([r + [0] * (s - len(r)) for r in ids])
    return table(ids).masked_fill(pad[..., None], 0.0), pad


def _save_grid(images: torch.Tensor, path: Path) -> None:
    """(b, 3, H, W) images in [0, 1] → one PNG row-major grid, 5 per row, 3× enlarged."""
    from PIL import Image

    b, _, h, w = images.shape
    cols = 5
    grid = torch.ones(3, (h + 2) * -(-b // cols), (w + 2) * cols)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[:, r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    x = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(x).resize((x.shape[1] * 3, x.shape[0] * 3), Image.NEAREST).save(path)


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cond", choices=("oracle", "caption"), default="oracle")
    parser.add_argument("--config", default=str(train_recipe.DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: the config's unet_lr")
    parser.add_argument("--eval-docs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="write the scores as JSON here (and the first 25 images as a PNG)")
    parser.add_argument("--save", default=None, help="save the trained weights to this file")
    parser.add_argument("--load", default=None, help="load weights instead of training")
    parser.add_argument("--guidance", type=float, default=None,
                        help="sampling guidance (default: the config's)")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="sampling steps (default: the config's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: the config's train.threads)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args(argv)
    cfg = train_recipe.load_config(args.config, list(args.overrides))
    threads = args.threads or cfg["train"].get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(args.seed)
    config, tokenizer = train_recipe.model_config(cfg)
    dim = config.llm.config["hidden_size"]
    visual = builders.build_visual(config.vision, llm_dim=dim)
    parts = builders.build_decoder(config.decoder, context_dim=dim,
                                   value_dim=visual.feature_info[0]["num_chs"],
                                   level_sizes=builders.level_sides(visual,
                                                                    config.vision.unet_levels))
    unet, encoder, sched = parts["unet"], parts["context_encoder"], parts["scheduler"]
    d = cfg["data"]
    colors = list(d["colors"])
    if args.cond == "oracle":
        table = OracleCondition(len(colors), dim)
    else:
        table = nn.Embedding(len(tokenizer), dim).requires_grad_(False)
    modules = nn.ModuleList([unet, encoder, table])
    t = cfg["train"]
    lr = args.lr if args.lr is not None else t["unet_lr"]
    opt = torch.optim.AdamW([p for p in modules.parameters() if p.requires_grad], lr=lr,
                            betas=tuple(t["betas"]), eps=t["eps"], weight_decay=t["weight_decay"])
    lr_sched = train_recipe.lr_schedule(opt, {**t, "steps": args.steps,
                                              "warmup": min(t["warmup"], args.steps)})
    corpus = ShapesCorpus(seed=d["seed"], size=d["image_size"], length=10**7,
                          kinds=("caption_image",), colors=colors, max_shapes=d["max_shapes"],
                          jitter=d["jitter"], tensors=True)
    gen = torch.Generator().manual_seed(args.seed)
    modules.train()
    start, losses = time.perf_counter(), []
    if args.load:
        modules.load_state_dict(torch.load(args.load))
    for step in range(0 if args.load else args.steps):
        docs = [corpus[step * args.batch_size + i] for i in range(args.batch_size)]
        ctx, pad = _conditions(docs, args.cond, colors, tokenizer, table)
        ehs = encoder(ctx, pad, generator=gen)
        images = torch.stack([x.images[0] for x in docs]) * 2 - 1
        loss = diffusion_loss(unet, sched, encoder_hidden_states=ehs, images=images,
                              synchronizer=parts["unet_sync"], pyramid=None,
                              has_image=None, generator=gen).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), t["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr_sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            logger.info("step %d loss %.4f (%.0fs)", step + 1, sum(losses[-50:]) / 50,
                        time.perf_counter() - start)
    train_seconds = time.perf_counter() - start
    if args.save:
        torch.save(modules.state_dict(), args.save)
    modules.eval()
    held = ShapesCorpus(seed=d["eval_seed"] + 1, size=d["image_size"], length=10**6,
                        kinds=("caption_image",), colors=colors, max_shapes=d["max_shapes"],
                        jitter=d["jitter"], tensors=True)
    docs = [held[i] for i in range(args.eval_docs)]
    sampler = ImageGenerator(unet=unet, scheduler=parts["inference_scheduler"],
                             synchronizer=parts["unet_sync"])
    dc, rows, g, first = config.decoder, [], torch.Generator().manual_seed(0), None
    with torch.no_grad():
        for s0 in range(0, len(docs), 25):
            chunk = docs[s0:s0 + 25]
            ctx, pad = _conditions(chunk, args.cond, colors, tokenizer, table)
            ehs = encoder(ctx, pad, drop=torch.zeros(len(chunk), dtype=torch.bool))
            imgs = sampler(ehs, negative_hidden_states=encoder.negative(1),
                           num_inference_steps=args.sampling_steps or dc.num_inference_steps,
                           guidance_scale=dc.guidance_scale if args.guidance is None
                           else args.guidance, generator=g)
            first = imgs if first is None else first
            rows += [score_generated(img, list(x.meta["images"][0]), colors)
                     for img, x in zip(imgs, chunk, strict=True)]
    if args.out:
        _save_grid(first, Path(args.out).with_suffix(".png"))
    keys = ("color_present", "shape_present", "position", "exact")
    result = {"cond": args.cond, "steps": args.steps, "batch_size": args.batch_size,
              "overrides": list(args.overrides),
              "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4) if losses else None,
              "guidance": args.guidance, "sampling_steps": args.sampling_steps,
              "train_seconds": round(train_seconds, 1),
              **{k: round(sum(float(r[k]) for r in rows) / len(rows), 3) for k in keys}}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    run()
