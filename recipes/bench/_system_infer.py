"""Inference timings and peak memory of the ``system`` benchmark (see ``bench.system``)."""

from __future__ import annotations

import gc
import inspect
import statistics

import torch

from bench import _system_util as su
from bench._common import measure

__all__ = ["inference", "peak_gib", "peak_reset"]


def peak_reset(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 2**20


def inference(model, args, device):
    from mmlayers.adapters.diffusion_sampling import ImageGenerator
    from mmlayers.layers.visibility import image_visibility
    from mmlayers.models.mm_interleaved import per_row_features

    tok = model.config.tokens
    batch = su.synthetic_batch(model, tokens=args.tokens - args.decode, images=8,
                               image_size=model.config.decoder.image_size).to(device)
    ids = batch.input_ids
    model.eval()
    cache_kw = "cache" if "cache" in inspect.signature(model.llm.forward).parameters \
        else "past_key_values"

    def cache_of(out):
        return out.cache if hasattr(out, "cache") else out.past_key_values
    state = {}

    @torch.no_grad()
    def first_token():
        vis = model.encode_images(batch.images)
        feats = per_row_features(vis.llm_features[0], batch.image_row, batch.images_per_row)
        visibility, _ = image_visibility(ids, soi_id=tok.soi_id, image_id=tok.image_id,
                                         bos_id=tok.bos_id, m=feats.shape[1])
        ctx = model.sync_handle.vision(feats, visibility)
        with ctx:
            out = model.llm(inputs_embeds=model.image_tokens.embed(ids, vis.tokens),
                            use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
        state.update(vis=vis, feats=feats, visibility=visibility, out=out, nxt=nxt)

    @torch.no_grad()
    def decode():
        out, nxt = state["out"], state["nxt"]
        with model.sync_handle.vision(state["feats"], state["visibility"]):
            for _ in range(args.decode):
                out = model.llm(input_ids=nxt[:, None], use_cache=True,
                                **{cache_kw: cache_of(out)})
                nxt = out.logits[:, -1].argmax(-1)

    ttft = measure(first_token, device=device, repeats=args.repeats)
    times = []
    for _ in range(args.repeats):   # the cache grows in place: a fresh prefill each time
        first_token()
        times.append(measure(decode, device=device, repeats=1, warmup=0))
    dec = statistics.median(times)
    d = model.llm.get_input_embeddings().weight.shape[1]
    span = torch.randn(1, 64, d, device=device, dtype=next(model.parameters()).dtype)
    gen = ImageGenerator(unet=model.unet, scheduler=model.inference_scheduler, vae=model.vae,
                         synchronizer=model.unet_sync)

    @torch.no_grad()
    def image():
        ehs = model.context_encoder(span, None, drop=torch.zeros(1, dtype=torch.bool))
        gen(ehs, negative_hidden_states=model.context_encoder.negative(1),
            pyramid=state["vis"].unet_features[0][-1:], has_image=torch.ones(1, dtype=torch.bool),
            num_inference_steps=args.gen_steps, guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(0))
    per_image = measure(image, device=device, repeats=max(1, args.repeats - 1))
    model.train()
    return {"prompt_tokens": int(ids.shape[1]), "images": 8, "ttft_s": ttft,
            "decode_tokens": args.decode, "decode_tokens_per_s": args.decode / max(dec, 1e-9),
            "image_steps": args.gen_steps, "guidance": args.guidance, "s_per_image": per_image,
            "image_size": model.config.decoder.image_size}
