"""Interleaved generation: InterleavedSession against loops that re-encode the document.

A 4-turn document on the tiny model: a prompt (text), then text (``--tokens`` greedy
tokens), an image (``--steps`` denoising steps with guidance), text, an image. Three ways,
measured in the same run:

- ``session``: :class:`~mmlayers.models.InterleavedSession` (KV cache across turns, each
  image encoded once, synchronizer values kept, one image generator);
- ``re-encode per turn``: the official loop: every turn re-runs the vision encoder on
  every image and the LLM on the whole document, decodes the turn's text with a KV cache,
  and builds a new image generator per image;
- ``re-encode per token``: the test oracle: the whole document (vision and LLM) for every
  token.

Outputs are compared (token ids and 8-bit images) before timing; the table states whether
they are equal. Times are process CPU seconds (median of ``--repeats`` runs): on a shared
machine other jobs inflate wall time, and with ``--threads 1`` CPU time is what the work
costs. Peak memory is the process's resident-set high-water mark above the start of each
run.

    python recipes/benchmark.py session [--threads 1] [--tokens 32] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import torch

from mmlayers.adapters.context import image_contexts
from mmlayers.adapters.diffusion_sampling import ImageGenerator
from mmlayers.data import ShapesCorpus, word_level_tokenizer
from mmlayers.layers.visibility import image_visibility
from mmlayers.models import InterleavedSession, MMInterleaved, MMInterleavedConfig
from mmlayers.models.generation import _cache_kwargs

from bench._common import format_table, peak_memory

PROMPT = "a red circle on the left ."


def build_model(seed: int = 0, preset: str = "tiny"):
    """The tiny model, or ``"wide"``: its LLM (512 wide, 8 layers, 32 visual tokens per
    image) and vision side (64 px, 256 wide, 6 layers) made larger, its UNet unchanged."""
    tok = word_level_tokenizer(ShapesCorpus(seed=0, length=8).vocabulary())
    torch.manual_seed(seed)
    cfg = MMInterleavedConfig.tiny(vocab_size=len(tok), image_size=64 if preset == "wide" else 32)
    if preset == "wide":
        cfg.llm.config.update(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                              num_attention_heads=8, num_key_value_heads=8)
        cfg.vision.config.update(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                 num_attention_heads=8)
        cfg.vision.num_tokens = 32
        cfg.decoder.image_size = cfg.decoder.unet["sample_size"] = 32
    model = MMInterleaved.from_config(cfg, tokenizer=tok).eval()
    with torch.no_grad():  # gates open, so the synchronizers do real work
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.5)
    return model, tok


class _Loop:
    """Re-encoding loops (``per_token``: the whole document for every token)."""

    def __init__(self, model, tok, per_token: bool):
        self.m, self.t, self.per_token = model, model.config.tokens, per_token
        self.ids = [self.t.bos_id] + tok(PROMPT, add_special_tokens=False)["input_ids"]
        self.images, self.text_id = [], self.ids[1]
        # what the session never writes in text either: padding and the unknown token
        self.quiet = [i for i in (self.t.pad_id, getattr(tok, "unk_token_id", None))
                      if isinstance(i, int) and i not in (self.t.eos_id, self.t.soi_id)]

    def _mask(self, logits):
        logits = logits.float().clone()
        logits[[self.t.image_id, self.t.bos_id, self.t.soi_id, self.t.eos_id,
                *self.quiet]] = float("-inf")
        return logits

    def _inputs(self, ids):
        m, n = self.m, len(self.images)
        vis = m.encode_images(torch.stack(self.images)) if n else None
        feats = m.llm_image_features(vis, torch.zeros(n, dtype=torch.long), torch.tensor([n]), 1)
        # rows past the prompt (new text) see what a text token at its end sees
        doc = torch.tensor([ids + [self.text_id]])
        vis_rows, _ = image_visibility(doc, soi_id=self.t.soi_id, image_id=self.t.image_id,
                                       bos_id=self.t.bos_id, m=n)
        embeds = m.image_tokens.embed(torch.tensor([ids]), None if vis is None else vis.tokens)
        return vis, feats, vis_rows, embeds

    def text(self, n_tokens: int):
        m = self.m
        if self.per_token:
            for _ in range(n_tokens):
                vis, feats, vis_rows, embeds = self._inputs(self.ids)
                with m.sync_handle.vision(feats, vis_rows[:, :-1]):
                    out = m.llm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)
                self.ids.append(int(self._mask(out.logits[0, -1]).argmax()))
            return
        vis, feats, vis_rows, embeds = self._inputs(self.ids)
        with m.sync_handle.vision(feats, vis_rows[:, :-1]):
            out = m.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        with m.sync_handle.vision(feats, vis_rows[:, -1]):   # (b, m): every new token
            for i in range(n_tokens):
                token = int(self._mask(out.logits[0, -1]).argmax())
                self.ids.append(token)
                if i < n_tokens - 1:
                    out = m.llm(input_ids=torch.tensor([[token]]), use_cache=True,
                                **_cache_kwargs(m.llm, out))

    def image(self, steps: int, seed: int):
        m, t = self.m, self.t
        self.ids.append(t.soi_id)
        vis, feats, vis_rows, embeds = self._inputs(self.ids)
        with m.sync_handle.vision(feats, vis_rows[:, :-1]):
            hidden = m.llm.get_decoder()(inputs_embeds=embeds).last_hidden_state
        ctx = image_contexts(hidden, torch.tensor([self.ids]), soi_id=t.soi_id, bos_id=t.bos_id,
                             max_length=m.config.decoder.max_context)
        ehs = m.context_encoder(ctx.hidden_states[-1:], ctx.padding_mask[-1:],
                                drop=torch.zeros(1, dtype=torch.bool))
        gen = ImageGenerator(unet=m.unet, scheduler=m.inference_scheduler, vae=m.vae,
                             synchronizer=m.unet_sync)
        img = gen(ehs, negative_hidden_states=m.context_encoder.negative(1),
                  pyramid=None if vis is None else vis.unet_features[0][-1:],
                  has_image=None if vis is None else torch.ones(1, dtype=torch.bool),
                  num_inference_steps=steps, guidance_scale=m.config.decoder.guidance_scale,
                  generator=torch.Generator().manual_seed(seed))[0]
        self.images.append((img.clamp(0, 1) * 255).round().to(torch.uint8).float() / 255)
        self.ids += [t.image_id] * m.config.vision.num_tokens


def _timed(clock: dict, key: str, fn, *args, **kwargs):
    t = time.process_time()
    out = fn(*args, **kwargs)
    clock[key] = clock.get(key, 0.0) + time.process_time() - t
    return out


def run_loop(model, tok, tokens: int, steps: int, per_token: bool, clock: dict):
    loop = _Loop(model, tok, per_token)
    with torch.no_grad():
        for turn in range(2):
            _timed(clock, "text", loop.text, tokens)
            _timed(clock, "image", loop.image, steps, seed=turn)
    return loop.ids, loop.images


def run_session(model, tok, tokens: int, steps: int, clock: dict):
    s = InterleavedSession(model, tok)
    s.add_text(PROMPT)
    for turn in range(2):
        _timed(clock, "text", s.generate_text, tokens, min_new_tokens=tokens, allow_image=False)
        _timed(clock, "image", s.generate_image, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(turn))
    return s.ids, s.images


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="benchmark.py session", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32, help="text tokens per text turn")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    p.add_argument("--preset", choices=["tiny", "wide"], default="tiny",
                   help="tiny model, or a wider LLM and vision side (same UNet)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (tests)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.steps, args.repeats = 4, 2, 1
    model, tok = build_model(preset=args.preset)
    ways = {"session": lambda c: run_session(model, tok, args.tokens, args.steps, c),
            "re-encode per turn": lambda c: run_loop(model, tok, args.tokens, args.steps, False, c),
            "re-encode per token": lambda c: run_loop(model, tok, args.tokens, args.steps, True, c)}
    ref_ids, ref_images = ways["session"]({})
    rows, base = [], None
    for name, fn in ways.items():
        ids, images = fn({})
        equal = ids == ref_ids and all(torch.equal((a * 255).round(), (b * 255).round())
                                       for a, b in zip(images, ref_images, strict=True))
        clocks = []
        for _ in range(args.repeats):
            clock = {}
            _timed(clock, "total", fn, clock)
            clocks.append(clock)
        t = {k: statistics.median(c[k] for c in clocks) for k in ("total", "text", "image")}
        mem = peak_memory(lambda fn=fn: fn({}))
        base = base or t
        rows.append([name, f"{t['total']:.3f}", f"{t['total'] / base['total']:.2f}",
                     f"{t['text']:.3f}", f"{t['text'] / base['text']:.2f}", f"{t['image']:.3f}",
                     f"{mem / 2**20:.1f}", "yes" if equal else "NO"])
    print(f"# session benchmark, {date.today()}, {args.preset} model, prompt + text {args.tokens} tokens, "
          f"image {args.steps} steps, text, image; threads {torch.get_num_threads()}")
    print(format_table(["way", "total CPU s", "× session", "text turns s", "× session (text)",
                        "image turns s", "peak MiB", "same output"], rows))


if __name__ == "__main__":
    main()
