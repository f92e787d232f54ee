"""Interleaved generation, turn after turn, with every cache kept between turns.

Shape key: n document tokens · m images · k visual tokens per image · s pyramid tokens
of one image · dv pyramid width · d LLM width · V vocabulary · c,H,W image.

Writing an interleaved document alternates: text until the model opens an image
(``<soi>``), the image, then more text. The official loop re-encodes the whole document
every turn (and every old image with the vision encoder) and rebuilds the diffusion
pipeline per image. An [`InterleavedSession`][mmlayers.models.session.InterleavedSession] keeps, across turns:

- the LLM's KV cache: only tokens not yet seen are run (a turn's prompt, each new token);
- per image, computed once when it is added: its k visual tokens, its pyramid for the
  LLM synchronizers and for the UNet synchronizers, and each LLM synchronizer's value
  projection ([`PreparedValues`][mmlayers.layers._sync_layout.PreparedValues] are rebuilt from the
  kept projections when an image is added);
- the LLM's last hidden states (the context of the next image) and one
  [`ImageGenerator`][mmlayers.adapters.diffusion_sampling.ImageGenerator] per scheduler.

With the same decoding settings and seeds it produces the text and images of a loop that
re-encodes the whole document for every token (checked in the tests, in float64).

Document layout: ``<s>`` text tokens, and ``<soi><image>×k`` per image. A generated
``</s>`` ends the document (it stays in it); a generated ``<soi>`` opens an image, which
[`generate_image`][mmlayers.models.session.InterleavedSession.generate_image] draws or [`add_image`][mmlayers.models.session.InterleavedSession.add_image]
fills. The context length is ``max_length`` tokens: a call that would exceed it raises
before changing anything (there is no sliding window).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch

from mmlayers.adapters.diffusion_sampling import ImageGenerator
from mmlayers.data.images import as_rgb_tensor
from mmlayers.layers.visibility import image_visibility
from mmlayers.models._session_images import SessionImagesMixin
from mmlayers.models._turns import TurnsMixin
from mmlayers.models.decoding import SamplingConfig, TextResult, beam_search, choose_token
from mmlayers.models.generation import cache_keyword

__all__ = ["InterleavedSession", "TextResult"]


class InterleavedSession(TurnsMixin, SessionImagesMixin):
    """An interleaved document (text and images) that an [`MMInterleaved`][mmlayers.models.mm_interleaved.MMInterleaved] extends.

    Args:
        model: an [`MMInterleaved`][mmlayers.models.mm_interleaved.MMInterleaved] (put in eval mode by the caller).
        tokenizer: default ``model.tokenizer``.
        max_length: most tokens in the document; default the LLM's
            ``max_position_embeddings``.

    Attributes:
        ids: the document's token ids. images: its images, (c, H, W) float in [0, 1].
        items: the document as text pieces and images, in order.
        stats: counters: ``vision_calls`` (images encoded), ``llm_tokens`` (tokens run
            through the LLM), ``llm_calls``.

    Examples:
        >>> import torch
        >>> from mmlayers.data import ShapesCorpus, word_level_tokenizer
        >>> from mmlayers.models import MMInterleaved, MMInterleavedConfig
        >>> tok = word_level_tokenizer(ShapesCorpus(seed=0, length=4).vocabulary())
        >>> _ = torch.manual_seed(0)
        >>> model = MMInterleaved.from_config(MMInterleavedConfig.tiny(vocab_size=len(tok)),
        ...                                   tokenizer=tok).eval()
        >>> session = InterleavedSession(model)
        >>> session.add_text("a red circle on the left.")
        >>> image = session.generate_image(num_inference_steps=2,
        ...                                generator=torch.Generator().manual_seed(0))
        >>> image.size, session.num_images
        ((32, 32), 1)
        >>> result = session.generate_text(max_new_tokens=4)
        >>> len(result.token_ids) <= 4, session.stats["vision_calls"]
        (True, 1)
    """

    def __init__(self, model, tokenizer: Any = None, *, max_length: int | None = None) -> None:
        self.model = model
        self.tokenizer = model._tokenizer(tokenizer)
        self.tok = model.config.tokens
        self.k = model.config.vision.num_tokens
        limit = getattr(model.llm.config.get_text_config(), "max_position_embeddings", None)
        if max_length is None:
            max_length = limit
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2 \
                or (limit is not None and max_length > limit):
            raise ValueError(f"max_length must be an int in [2, {limit}] (the LLM's "
                             f"max_position_embeddings), got {max_length!r}")
        self.max_length = max_length
        blocks = model.llm_sync.blocks
        self._sync0 = next(iter(blocks.values())).sync
        self._cache_kw = cache_keyword(model.llm)
        self._generators: dict[str, ImageGenerator] = {}
        self._negative = None
        self.reset()

    # ------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Start an empty document (``<s>`` only); caches are dropped."""
        self.ids: list[int] = [self.tok.bos_id]
        self.images: list[torch.Tensor] = []
        self.items: list[Any] = []
        self._fed, self._cache, self._hidden, self._logits = 0, None, [], None
        self._vis_tokens, self._llm_feats, self._unet_feats = [], [], []
        self._proj: dict[str, torch.Tensor] = {}
        self._prepared = self._stacked = self._text_row = None
        self.stats = {"vision_calls": 0, "llm_tokens": 0, "llm_calls": 0}

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def image_open(self) -> bool:
        """The document ends with ``<soi>``: the next item must be an image."""
        return self.ids[-1] == self.tok.soi_id

    @property
    def has_decoder(self) -> bool:
        return getattr(self.model, "unet", None) is not None

    def _param(self) -> torch.Tensor:
        return self.model.llm.get_input_embeddings().weight

    def _room(self, extra: int, what: str) -> None:
        if len(self.ids) + extra > self.max_length:
            raise ValueError(f"{what} needs {extra} more tokens but the document holds "
                             f"{len(self.ids)} of max_length={self.max_length}; start a new "
                             f"session (reset()) or use a larger max_length")

    def _check_image_room(self, what: str) -> None:
        limit = self._sync0.max_images - 1
        if self.num_images + 1 > limit:
            raise ValueError(f"the document already holds {self.num_images} images; the LLM "
                             f"synchronizers take at most {limit} (max_images - 1)")
        self._room(self.k + (0 if self.image_open else 1), what)

    def _not_empty(self, what: str) -> None:
        if not self.items:
            raise ValueError(f"{what}: the document is empty; add_text() or add_image() first")

    # ------------------------------------------------------------------------ adding
    def add_text(self, text: str) -> None:
        """Append text (tokenised without special tokens).

        Raises:
            TypeError: ``text`` is not a string. ValueError: it is empty, an image is open,
                or the document would exceed ``max_length``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self.image_open:
            raise ValueError("an image is open (the document ends with <soi>): call "
                             "generate_image() or add_image() first")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"text {text!r} has no tokens")
        self._room(len(ids), "this text")
        self.ids += ids
        self.items.append(text)

    def add_image(self, image: Any) -> None:
        """Append an image (a PIL image, a (c, H, W) tensor in [0, 1] or an image file path);
        it fills an open ``<soi>`` if there is one. The vision side encodes it once, here.

        Raises:
            ValueError: unreadable file, bad tensor, too many images, or the document would
                exceed ``max_length``; nothing is changed then.
        """
        tensor = as_rgb_tensor(image)
        self._check_image_room("this image")
        self._encode(tensor)
        self.ids += ([] if self.image_open else [self.tok.soi_id]) + [self.tok.image_id] * self.k
        self.images.append(tensor)
        self.items.append(tensor)

    @torch.no_grad()
    def _encode(self, image: torch.Tensor) -> None:
        vis = self.model.encode_images(image[None])
        self.stats["vision_calls"] += 1
        llm_feats = vis.llm_features[0][0]
        self._vis_tokens.append(vis.tokens[0])
        self._llm_feats.append(llm_feats)
        self._unet_feats.append(vis.unet_features[0][0])
        for key, block in self.model.llm_sync.blocks.items():
            proj = block.project_values(llm_feats[None, None])
            self._proj[key] = proj if key not in self._proj else torch.cat([self._proj[key], proj], 1)
        self._prepared = self._stacked = self._text_row = None

    # ----------------------------------------------------------------------- the LLM
    def _features(self) -> torch.Tensor:
        if self._stacked is None:
            p = self.model.visual.pos_proj.weight
            self._stacked = (torch.stack(self._llm_feats)[None] if self._llm_feats else
                             p.new_zeros(1, 0, self._sync0.tokens_per_image, self._sync0.value_dim))
        return self._stacked

    def _visibility(self, ids: torch.Tensor) -> torch.Tensor:
        """Visibility of the rows of ``ids`` (B, t), the document's next tokens: (1, m) if
        they are all plain text (each then sees what a text token at the document's end
        sees, kept until the images change), else (1, n, m) over the whole document."""
        t, m = self.tok, len(self._llm_feats)
        special = torch.tensor([t.bos_id, t.soi_id, t.image_id], device=ids.device)
        if not bool(torch.isin(ids, special).any()):
            if self._text_row is None:
                doc = torch.tensor(self.ids[:self._fed] + [t.eos_id], device=ids.device)[None]
                vis, _ = image_visibility(doc, soi_id=t.soi_id, image_id=t.image_id,
                                          bos_id=t.bos_id, m=m)
                self._text_row = vis[:, -1]
            return self._text_row
        self._text_row = None
        doc = torch.tensor(self.ids, device=ids.device)[None]
        vis, _ = image_visibility(doc, soi_id=t.soi_id, image_id=t.image_id, bos_id=t.bos_id, m=m)
        return vis

    def _prepared_values(self):
        if self._prepared is None and self._proj:
            self._prepared = {key: block.sync.prepare_values(values=self._proj[key])
                              for key, block in self.model.llm_sync.blocks.items()}
        return self._prepared

    def _run(self, ids: torch.Tensor, cache):
        """Run ``ids`` (B, t), the document's next tokens (or the beams'), after ``cache``
        → (model output, cache)."""
        m = self.model
        emb = m.image_tokens.token_embeddings(ids, m.llm.get_input_embeddings())
        slots = ids == self.tok.image_id
        r = int(slots.sum()) // self.k
        if r:
            vis_tokens = torch.cat(self._vis_tokens[-r:]).to(emb.dtype)
            emb = emb.masked_scatter(slots[..., None], vis_tokens)
        feats, visibility = self._features(), self._visibility(ids)
        kw = {} if cache is None else {self._cache_kw: cache}
        with m.sync_handle.vision(feats, visibility, prepared=self._prepared_values()):
            out = m.llm(inputs_embeds=emb, use_cache=True, output_hidden_states=True,
                        logits_to_keep=1, **kw)
        self.stats["llm_tokens"] += ids.numel()
        self.stats["llm_calls"] += 1
        cache = getattr(out, "cache", None)
        return out, (out.past_key_values if cache is None else cache)

    @torch.no_grad()
    def _feed(self) -> None:
        """Run the document's tokens that are not in the KV cache yet."""
        if self._fed == len(self.ids):
            return
        new = torch.tensor(self.ids[self._fed:], device=self._param().device)[None]
        out, self._cache = self._run(new, self._cache)
        self._hidden.append(out.hidden_states[-1][0])
        self._logits = out.logits[0, -1]
        self._fed = len(self.ids)

    def _masked(self, allow_image: bool) -> list[int]:
        """Tokens text generation never picks: ``<image>`` (only after ``<soi>``), ``<s>``
        (it would start another document), padding and the tokenizer's unknown token
        (both decode to nothing: a turn of them would be an invisible, empty turn; left
        allowed where they share an id with ``</s>`` or ``<soi>``) and, unless allowed,
        ``<soi>``."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        quiet = [i for i in (self.tok.pad_id, unk)
                 if isinstance(i, int) and i not in (self.tok.eos_id, self.tok.soi_id)]
        return [self.tok.image_id, self.tok.bos_id, *quiet] + \
            ([] if allow_image else [self.tok.soi_id])

    def _text_logits(self, allow_image: bool) -> torch.Tensor:
        logits = self._logits.float().clone()
        logits[self._masked(allow_image)] = float("-inf")
        return logits

    # ----------------------------------------------------------------------- text
    def _start_text(self, max_new_tokens: int, allow_image: bool | None) -> tuple[int, bool]:
        self._not_empty("generate_text")
        if self.image_open:
            raise ValueError("an image is open (the document ends with <soi>): call "
                             "generate_image() or add_image() first")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        self._room(1, "generating text")
        allow = self.has_decoder if allow_image is None else bool(allow_image)
        return min(max_new_tokens, self.max_length - len(self.ids)), allow

    def _tokens(self, max_new: int, allow_image: bool, sampling: SamplingConfig,
                generator: torch.Generator | None, min_new: int = 0) -> Iterator[int]:
        stops = (self.tok.eos_id, self.tok.soi_id)
        new: list[int] = []
        for i in range(max_new):
            self._feed()
            logits = self._text_logits(allow_image)
            if i < min_new:
                logits[list(stops)] = float("-inf")
            token = choose_token(logits, sampling, generator=generator, previous=new)
            new.append(token)
            self.ids.append(token)
            yield token
            if token in stops:
                return

    def _result(self, tokens: list[int]) -> TextResult:
        stop = tokens[-1] if tokens and tokens[-1] in (self.tok.eos_id, self.tok.soi_id) else None
        body = tokens[:-1] if stop is not None else tokens
        text = self.tokenizer.decode(body, skip_special_tokens=True) if body else ""
        if text:
            self.items.append(text)
        return TextResult(text, tokens, stop == self.tok.soi_id, stop == self.tok.eos_id)

    def generate_text(self, max_new_tokens: int = 32, *, do_sample: bool = False,
                      temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, num_beams: int = 1,
                      length_penalty: float = 1.0, generator: torch.Generator | None = None,
                      allow_image: bool | None = None, min_new_tokens: int = 0,
                      repetition_penalty: float = 1.0) -> TextResult:
        """Continue the document with text until ``</s>``, ``<soi>`` or ``max_new_tokens``.

        Args:
            max_new_tokens: most new tokens.
            do_sample: sample instead of greedy decoding (see
                [`SamplingConfig`][mmlayers.models.decoding.SamplingConfig]).
            temperature: sampling temperature.
            top_k: sample among the ``top_k`` most likely tokens.
            top_p: nucleus sampling mass.
            num_beams: beam search with ``num_beams > 1`` (no sampling).
            length_penalty: beam-search length penalty.
            generator: seeds the sampling draws.
            allow_image: let the model open an image (``<soi>``); default: if the model has
                an image decoder.
            min_new_tokens: ``</s>`` and ``<soi>`` are not chosen before this many tokens
                (greedy and sampling).
            repetition_penalty: penalty on the tokens already generated in this call
                (greedy and sampling; the official decoding uses 1.3, see
                [`OFFICIAL_SAMPLING`][mmlayers.models.decoding.OFFICIAL_SAMPLING]).

        Returns:
            a [`TextResult`][mmlayers.models.decoding.TextResult]; the new tokens are now part of the document.
        """
        max_new, allow = self._start_text(max_new_tokens, allow_image)
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, repetition_penalty)
        if num_beams > 1:
            if do_sample:
                raise ValueError("beam search does not sample: use num_beams=1 with do_sample")
            if repetition_penalty != 1:
                raise ValueError(f"beam search has no repetition penalty: use num_beams=1 "
                                 f"with repetition_penalty={repetition_penalty!r}")
            tokens = self._beam(max_new, allow, num_beams, length_penalty)
            self.ids += tokens
        else:
            tokens = list(self._tokens(max_new, allow, sampling, generator, min_new_tokens))
        return self._result(tokens)

    @torch.no_grad()
    def _beam(self, max_new: int, allow: bool, num_beams: int, length_penalty: float) -> list[int]:
        self._feed()
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(num_beams)
        dev = self._param().device

        def step(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
            pad = num_beams - len(parents)   # fewer open hypotheses: repeat the first one
            cache.reorder_cache(torch.cat([parents, parents[:1].expand(pad)]).to(dev))
            step_ids = torch.cat([tokens, tokens[:1].expand(pad)]).to(dev)[:, None]
            # beams never hold <s> or <soi> (masked / stop tokens): all rows are plain text
            out, _ = self._run(step_ids, cache)
            logits = out.logits[:, -1].float()
            logits[:, self._masked(allow)] = float("-inf")
            return logits.log_softmax(-1)[: len(parents)].cpu()

        first = self._text_logits(allow).log_softmax(-1).cpu()
        return beam_search(step, first, num_beams=num_beams, max_new_tokens=max_new,
                           stop_ids={self.tok.eos_id, self.tok.soi_id},
                           length_penalty=length_penalty)
