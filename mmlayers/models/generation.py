"""Generation helpers of [`MMInterleaved`][mmlayers.models.mm_interleaved.MMInterleaved]: captions and images.

Shape key: b prompts · n tokens · m images · k visual tokens per image · s pyramid tokens ·
c,H,W image.

- [`GenerationMixin.caption`][mmlayers.models.generation.GenerationMixin.caption]: ``<s><soi><image>×k [prompt]`` → greedy text until
  ``</s>`` (or ``<soi>``), with the KV cache; generated tokens see the image (last row of
  the visibility mask).
- [`GenerationMixin.generate_images`][mmlayers.models.generation.GenerationMixin.generate_images]: an interleaved prompt (text and images) +
  ``<soi>`` → LLM hidden states → context encoder → UNet sampling with classifier-free
  guidance (the learned negative embedding); the UNet synchronizers read the pyramid of
  the prompt's last image, so "now the same circle in blue." after an image is an edit.

A fuller interleaved session (text and images alternating, caches kept across turns) is
``mmlayers.models.session``'s job; these helpers re-encode the prompt on every call.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from mmlayers.adapters.context import image_contexts
from mmlayers.adapters.diffusion_sampling import ImageGenerator
from mmlayers.data.document import image_to_tensor

__all__ = ["GenerationMixin", "encode_prompt"]


def encode_prompt(tokenizer: Any, items: Sequence[Any], *, bos_id: int, soi_id: int,
                  image_id: int, tokens_per_image: int, open_image: bool = False
                  ) -> tuple[list[int], list[torch.Tensor]]:
    """Interleaved items → ``(token ids, image tensors)``: ``<s>`` + text tokens +
    ``<soi><image>×k`` per image (+ a final ``<soi>`` with ``open_image``).

    Examples:
        >>> from mmlayers.data import word_level_tokenizer
        >>> tok = word_level_tokenizer(["a red circle."])
        >>> ids, imgs = encode_prompt(tok, [torch.zeros(3, 4, 4), "a circle."], bos_id=1,
        ...                           soi_id=4, image_id=5, tokens_per_image=2, open_image=True)
        >>> tok.convert_ids_to_tokens(ids), len(imgs)
        (['<s>', '<soi>', '<image>', '<image>', 'a', 'circle', '.', '<soi>'], 1)
    """
    ids, images = [bos_id], []
    for item in items:
        if isinstance(item, str):
            ids += list(tokenizer(item, add_special_tokens=False)["input_ids"])
        else:
            images.append(image_to_tensor(item))
            ids += [soi_id] + [image_id] * tokens_per_image
    if open_image:
        ids.append(soi_id)
    return ids, images


def cache_keyword(llm) -> str:
    """The keyword this transformers version's ``forward`` takes the KV cache under
    (``cache`` in 5.x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _cache_kwargs(llm, out) -> dict:
    """The KV cache of ``out`` as the keyword `cache_keyword` names."""
    cache = getattr(out, "cache", None)
    return {cache_keyword(llm): out.past_key_values if cache is None else cache}


class GenerationMixin:
    """Captioning and image generation for [`MMInterleaved`][mmlayers.models.mm_interleaved.MMInterleaved]."""

    def _tokenizer(self, tokenizer):
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("no tokenizer: pass tokenizer= or build the model with one")
        return tokenizer

    def _prompts(self, prompts, tokenizer, open_image):
        tok, k = self.config.tokens, self.config.vision.num_tokens
        if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence) \
                or not prompts:
            raise TypeError("prompts must be a non-empty list of item lists (text and images)")
        rows, images, counts = [], [], []
        for p in prompts:
            items = [p] if isinstance(p, str) else list(p)
            ids, imgs = encode_prompt(tokenizer, items, bos_id=tok.bos_id, soi_id=tok.soi_id,
                                      image_id=tok.image_id, tokens_per_image=k,
                                      open_image=open_image)
            rows.append(ids)
            images += imgs
            counts.append(len(imgs))
        return rows, images, counts

    def _encode_rows(self, rows, images, counts):
        """Right-padded ids, attention mask, visual features and the LLM's last hidden state."""
        dev = self.llm.get_input_embeddings().weight.device
        n = max(len(r) for r in rows)
        pad = self.config.tokens.pad_id
        ids = torch.tensor([r + [pad] * (n - len(r)) for r in rows], device=dev)
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], device=dev)
        vis = self.encode_images(torch.stack(images).to(dev)) if images else None
        per_row = torch.tensor(counts, device=dev)
        image_row = torch.repeat_interleave(torch.arange(len(rows), device=dev), per_row)
        return ids, mask, vis, image_row, per_row

    @torch.no_grad()
    def caption(self, images: torch.Tensor, *, prompt: str | None = None,
                max_new_tokens: int = 24, tokenizer: Any = None) -> list[str]:
        """Greedy captions of images (b, c, H, W) in [0, 1]: one string per image.

        The prompt is ``<s><soi><image>×k`` (+ ``prompt`` text); decoding stops at ``</s>``
        or ``<soi>``.
        """
        tokenizer = self._tokenizer(tokenizer)
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (b, c, H, W) tensor, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        tok = self.config.tokens
        prompts = [[img] + ([prompt] if prompt else []) for img in images]
        rows, imgs, counts = self._prompts(prompts, tokenizer, open_image=False)
        ids, mask, vis, image_row, per_row = self._encode_rows(rows, imgs, counts)
        from mmlayers.layers.visibility import image_visibility
        from mmlayers.models.mm_interleaved import per_row_features

        feats = per_row_features(vis.llm_features[0], image_row, per_row)
        visibility, _ = image_visibility(ids, soi_id=tok.soi_id, image_id=tok.image_id,
                                         bos_id=tok.bos_id, m=feats.shape[1])
        embeds = self.image_tokens.embed(ids, vis.tokens)
        b = ids.shape[0]
        out_ids = torch.empty(b, 0, dtype=torch.long, device=ids.device)
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        stop = torch.tensor([tok.eos_id, tok.soi_id], device=ids.device)
        with self.sync_handle.vision(feats, visibility):
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
            for _ in range(max_new_tokens):
                nxt = out.logits[:, -1].float()
                nxt[:, tok.image_id] = float("-inf")
                nxt = nxt.argmax(-1).masked_fill(done, tok.eos_id)
                out_ids = torch.cat([out_ids, nxt[:, None]], 1)
                done |= torch.isin(nxt, stop)
                if bool(done.all()):
                    break
                mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
                out = self.llm(input_ids=nxt[:, None], attention_mask=mask, use_cache=True,
                               **_cache_kwargs(self.llm, out))
        texts = []
        for row in out_ids.tolist():
            cut = next((i for i, t in enumerate(row) if t in (tok.eos_id, tok.soi_id)), len(row))
            texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
        return texts

    @torch.no_grad()
    def generate_images(self, prompts: Sequence[Any], *, num_inference_steps: int | None = None,
                        guidance_scale: float | None = None,
                        generator: torch.Generator | None = None, tokenizer: Any = None
                        ) -> torch.Tensor:
        """Generate the image that follows each prompt → (b, 3, H, W) in [0, 1].

        Args:
            prompts: one item list per image (text ``str`` and images as (c, H, W) tensors
                in [0, 1] or PIL images), e.g. ``["a red circle on the left."]`` or
                ``["a red circle.", image, "now the same circle in blue."]``; a bare string
                is a one-item prompt. ``<soi>`` is appended.
            num_inference_steps: denoising steps; default the config's.
            guidance_scale: classifier-free guidance scale; default the config's.
            generator: seeds the initial noise.
            tokenizer: tokenizer for the prompts' text; default the model's.

        The UNet synchronizers read the pyramid of each prompt's last image (none if the
        prompt has no image).
        """
        tokenizer = self._tokenizer(tokenizer)
        dc, tok = self.config.decoder, self.config.tokens
        rows, imgs, counts = self._prompts(prompts, tokenizer, open_image=True)
        ids, mask, vis, image_row, per_row = self._encode_rows(rows, imgs, counts)
        hidden, _ = self._run_llm(ids, mask, vis, image_row, per_row, logits=False)
        ctx = image_contexts(hidden, ids, soi_id=tok.soi_id, bos_id=tok.bos_id,
                             max_length=dc.max_context)
        last = torch.cumsum(per_row + 1, 0) - 1     # each row's final (open) <soi>
        ehs = self.context_encoder(ctx.hidden_states[last], ctx.padding_mask[last],
                                   drop=torch.zeros(len(rows), dtype=torch.bool))
        pyramid = has_image = None
        if vis is not None:
            prev = (torch.cumsum(per_row, 0) - 1).clamp(min=0)   # each row's last image
            pyramid = vis.unet_features[0][prev]
            has_image = (per_row > 0) & dc.sync_previous_image
        gen = ImageGenerator(unet=self.unet, scheduler=self.inference_scheduler, vae=self.vae,
                             synchronizer=self.unet_sync)
        return gen(ehs, negative_hidden_states=self.context_encoder.negative(1),
                   pyramid=pyramid, has_image=has_image,
                   num_inference_steps=num_inference_steps or dc.num_inference_steps,
                   guidance_scale=dc.guidance_scale if guidance_scale is None else guidance_scale,
                   generator=generator)
