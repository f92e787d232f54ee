"""MMInterleaved: ViT → LLM with feature synchronizers → text head, and LLM → diffusion UNet.

Shape key: b rows · n tokens · m images (all rows) · k visual tokens per image ·
s flattened pyramid tokens of one image · d width · V vocabulary · c,H,W image.

One training forward on an [`InterleavedBatch`][mmlayers.data.collate.InterleavedBatch] (the paper's
system, as the official code computes it)::

    vis        = VisualTokenizer(images)                  tokens (m, k, d), pyramid
    embeds     = ImageTokens.embed(input_ids, vis.tokens)  <image> slots ← visual tokens
    h, logits  = LLM(embeds) with synchronizers reading vis.llm_features (b, m_row, s, dv)
                 under image_visibility(input_ids)
    text_loss  = CE(logits[:, :-1], labels[:, 1:]), mean over targets ≠ −100
    ctx_i      = h[latest <s> … <soi>_i] for every image i with context
    image_loss = Σ_i diffusion_MSE(UNet(x_i; ContextEncoder(ctx_i);
                                        synchronizer ← vis.unet_features[previous(i)]))
                 / (m  or  #images with context)
    loss       = text_weight · text_loss + image_weight · image_loss      (1 and 10)

Labels come from the collator (pad, ``<image>``, ``<s>``, ``<s>``→``<soi>``, prompts and
caption-first text are −100); images whose context is only ``<s><soi>`` get no diffusion
loss and do not run the UNet.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlayers._optional import require
from mmlayers.adapters.context import image_contexts
from mmlayers.adapters.diffusion_objective import diffusion_loss
from mmlayers.adapters.image_tokens import ImageTokens
from mmlayers.adapters.llm import attach_synchronizers
from mmlayers.layers.visibility import image_visibility
from mmlayers.models import builders
from mmlayers.models.config import MMInterleavedConfig
from mmlayers.models.generation import GenerationMixin

__all__ = ["MMInterleaved", "MMInterleavedOutput", "per_row_features"]

logger = logging.getLogger(__name__)

_WEIGHTS, _CONFIG, _TOKENIZER = "model.safetensors", "config.json", "tokenizer"


@dataclass
class MMInterleavedOutput:
    """What [`MMInterleaved.forward`][mmlayers.models.mm_interleaved.MMInterleaved.forward] returns.

    Attributes:
        loss: scalar ``text_weight · text_loss + image_weight · image_loss``.
        text_loss: scalar mean next-token CE over the non-ignored targets (0 if none).
        image_loss: scalar diffusion MSE, reduced as ``LossConfig.image_reduction`` (0 if no
            image has context).
        image_losses: (m,) per-image MSE, 0 for images without context.
        logits: (b, n, V') next-token logits (V' includes the image tokens).
        num_text_targets: number of non-ignored text targets.
    """

    loss: torch.Tensor
    text_loss: torch.Tensor
    image_loss: torch.Tensor
    image_losses: torch.Tensor
    logits: torch.Tensor
    num_text_targets: int


def per_row_features(flat: torch.Tensor, image_row: torch.Tensor,
                     images_per_row: torch.Tensor) -> torch.Tensor:
    """Images numbered row by row (m, s, d) → per-row stacks (b, m_row, s, d), zero-padded.

    Examples:
        >>> f = torch.arange(3.0).view(3, 1, 1)
        >>> out = per_row_features(f, torch.tensor([0, 0, 1]), torch.tensor([2, 1]))
        >>> out[..., 0, 0].tolist()
        [[0.0, 1.0], [2.0, 0.0]]
    """
    b = images_per_row.shape[0]
    m_row = int(images_per_row.max()) if b else 0
    first = torch.cumsum(images_per_row, 0) - images_per_row
    col = torch.arange(flat.shape[0], device=flat.device) - first[image_row]
    out = flat.new_zeros(b, m_row, *flat.shape[1:])
    out[image_row, col] = flat
    return out


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize (in float32 for half types on CPU, which has no kernel)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    x = images.float() if images.device.type == "cpu" and images.dtype in (
        torch.bfloat16, torch.float16) else images
    out = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.to(images.dtype)


class MMInterleaved(GenerationMixin, nn.Module):
    """The composed MM-Interleaved model (module docstring), built from its parts.

    Use [`from_config`][mmlayers.models.mm_interleaved.MMInterleaved.from_config] (or [`from_pretrained`][mmlayers.models.mm_interleaved.MMInterleaved.from_pretrained]) rather than the constructor.
    The constructor attaches the LLM's synchronizers and image tokens (hooks; the LLM's own
    weights and keys are unchanged) and keeps every part as a submodule:
    ``llm``, ``visual``, ``llm_sync`` (the synchronizer blocks), ``image_tokens``,
    ``context_encoder``, ``unet``, ``unet_sync`` and ``vae`` (or ``None``).

    Args:
        config: the [`MMInterleavedConfig`][mmlayers.models.config.MMInterleavedConfig] the parts follow.
        llm: a Hugging Face causal LM.
        visual: a [`VisualTokenizer`][mmlayers.vision.VisualTokenizer].
        unet: a diffusers ``UNet2DConditionModel`` (from
            [`build_decoder`][mmlayers.models.builders.build_decoder], as are the next five).
        scheduler: the training noise scheduler.
        inference_scheduler: the sampling scheduler.
        context_encoder: an [`ImageContextEncoder`][mmlayers.adapters.context.ImageContextEncoder].
        unet_sync: a [`UNetSynchronizer`][mmlayers.adapters.unet_sync.UNetSynchronizer]
            attached to ``unet``.
        vae: an ``AutoencoderKL``, or ``None`` for a pixel-space UNet.
        tokenizer: optional tokenizer, used by the generation helpers and saved with the model.

    Examples:
        >>> import torch
        >>> from mmlayers.data import InterleavedCollator, ShapesCorpus, word_level_tokenizer
        >>> corpus = ShapesCorpus(seed=0, length=4, kinds=("caption_image", "edit"))
        >>> tok = word_level_tokenizer(corpus.vocabulary())
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = MMInterleaved.from_config(
        ...     MMInterleavedConfig.tiny(vocab_size=len(tok)), tokenizer=tok)
        >>> batch = InterleavedCollator(tokenizer=tok, num_image_tokens=8, max_length=96)(
        ...     list(corpus))
        >>> out = model(batch, generator=torch.Generator().manual_seed(0))
        >>> bool(out.loss > 0), bool(out.image_loss > 0)
        (True, True)
        >>> len(out.image_losses) == len(batch.images)
        True
    """

    def __init__(self, *, config: MMInterleavedConfig, llm: nn.Module, visual: nn.Module,
                 unet: nn.Module, scheduler: Any, context_encoder: nn.Module,
                 unet_sync: nn.Module, inference_scheduler: Any = None,
                 vae: nn.Module | None = None, tokenizer: Any = None) -> None:
        super().__init__()
        self.config = config
        tok, lc = config.tokens, config.llm
        self.llm, self.visual = llm, visual
        value_dim = visual.feature_info[0]["num_chs"] if visual.feature_info else None
        if value_dim is None:
            raise ValueError("the visual tokenizer has no pyramid; the synchronizers need one")
        handle = attach_synchronizers(
            llm, every=lc.sync_every, layers=lc.sync_layers, value_dim=value_dim,
            dim=lc.sync_dim, heads=lc.sync_heads, points=lc.sync_points,
            level_sizes=builders.level_sides(visual, list(config.vision.llm_levels)),
            base_size=lc.sync_base_size, offset_init=lc.sync_offset_init,
            max_images=lc.max_images, backend=config.backend)
        self.sync_handle = handle
        if lc.gradient_checkpointing:  # recomputation re-opens the images of the forward
            kwargs = {"use_reentrant": False, "context_fn": handle.checkpoint_context_fn}
            if hasattr(llm, "activation_checkpointing_enable"):   # transformers >= 5
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.llm_sync = handle.adapter
        d = llm.get_input_embeddings().weight.shape[1]
        self.image_tokens = ImageTokens(hidden_size=d, soi_id=tok.soi_id, image_id=tok.image_id,
                                        tokens_per_image=config.vision.num_tokens,
                                        init_logit=lc.image_token_init_logit)
        self.image_tokens.init_rows_from(llm.get_input_embeddings())
        self.image_tokens.attach(llm)
        self.unet, self.vae, self.context_encoder, self.unet_sync = unet, vae, context_encoder, unet_sync
        self.scheduler = scheduler
        self.inference_scheduler = inference_scheduler or scheduler
        self.tokenizer = tokenizer

    # -------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: MMInterleavedConfig | dict, *, tokenizer: Any = None,
                    train_policy: bool = True) -> MMInterleaved:
        """Build every part (local directories or random init) and, with ``train_policy``,
        set ``requires_grad`` as the config says ([`apply_training_policy`][mmlayers.models.mm_interleaved.MMInterleaved.apply_training_policy])."""
        config = builders.resolve_config(config)
        llm = builders.build_llm(config.llm)
        d = llm.get_input_embeddings().weight.shape[1]
        visual = builders.build_visual(config.vision, llm_dim=d)
        value_dim = visual.feature_info[0]["num_chs"]
        parts = builders.build_decoder(
            config.decoder, context_dim=d, value_dim=value_dim,
            level_sizes=builders.level_sides(visual, list(config.vision.unet_levels)),
            backend=config.backend)
        model = cls(config=config, llm=llm, visual=visual, tokenizer=tokenizer, **parts)
        return model.apply_training_policy() if train_policy else model

    def apply_training_policy(self) -> MMInterleaved:
        """Freeze what the config freezes (LLM, ViT, UNet, always the VAE); every adapter
        (synchronizers, image tokens, pyramid, resampler, context encoder) trains."""
        cfg = self.config
        self.requires_grad_(True)
        self.llm.requires_grad_(not cfg.llm.freeze)
        self.visual.freeze_vit(cfg.vision.freeze)
        self.unet.requires_grad_(not cfg.decoder.freeze_unet)
        if self.vae is not None:
            self.vae.requires_grad_(False)
        for p in [*self.llm_sync.parameters(), *self.image_tokens.parameters(),
                  *self.unet_sync.parameters(), *self.context_encoder.parameters()]:
            p.requires_grad_(True)
        return self

    def parameter_groups(self, *, lr: float = 1e-4, unet_lr: float = 1e-5,
                         offset_lr: float = 1e-5, weight_decay: float = 0.05,
                         prefix_lrs: dict[str, float] | None = None) -> list[dict]:
        """AdamW groups: every ``sampling_offsets`` at ``offset_lr``, parameters whose name
        starts with a key of ``prefix_lrs`` at its value (e.g. ``{"context_encoder.": 1e-4}``),
        ``unet.*`` at ``unet_lr``, the rest at ``lr``; no weight decay on biases, norms, gates
        and other 1-D parameters. Each group has a ``"names"`` entry for inspection."""
        groups: dict[tuple[float, float], dict] = {}
        prefix_lrs = dict(prefix_lrs or {})
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            rate = next((v for k, v in prefix_lrs.items() if name.startswith(k)),
                        unet_lr if name.startswith("unet.") else lr)
            if "sampling_offsets" in name:
                rate = offset_lr
            decay = 0.0 if p.dim() <= 1 or name.endswith("gate") else weight_decay
            g = groups.setdefault((rate, decay), {"params": [], "names": [], "lr": rate,
                                                  "weight_decay": decay})
            g["params"].append(p)
            g["names"].append(name)
        return list(groups.values())

    # ------------------------------------------------------------------------ pieces
    @property
    def vit_image_size(self) -> tuple[int, int]:
        return tuple(self.visual.vit.image_size)

    def encode_images(self, images: torch.Tensor):
        """(m, c, H, W) images in [0, 1] → [`VisualTokenizerOutput`][mmlayers.vision.VisualTokenizerOutput]
        (resized to the ViT's input size when needed)."""
        p = self.visual.pos_proj.weight
        return self.visual(_resize(images.to(p.device, p.dtype), self.vit_image_size))

    def _run_llm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 vis, image_row: torch.Tensor, images_per_row: torch.Tensor,
                 logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LLM with image slots and synchronizers → (hidden (b, n, d), logits (b, n, V'))."""
        tok = self.config.tokens
        embeds = self.image_tokens.embed(input_ids, None if vis is None else vis.tokens)
        feats = self.llm_image_features(vis, image_row, images_per_row, input_ids.shape[0])
        visibility, _ = image_visibility(input_ids, soi_id=tok.soi_id, image_id=tok.image_id,
                                         bos_id=tok.bos_id, m=feats.shape[1])
        with self.sync_handle.vision(feats, visibility):
            hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                            use_cache=False).last_hidden_state
        out = self.llm.get_output_embeddings()(hidden) if logits else None
        return hidden, out

    def llm_image_features(self, vis, image_row: torch.Tensor, images_per_row: torch.Tensor,
                           batch: int) -> torch.Tensor:
        """Per-row LLM synchronizer inputs (b, m_row, s, dv) from the images' tokenizer
        output; (b, 0, s, dv) without images, so that text is synchronized the same way
        (every query sees no image) whether or not images follow it."""
        if vis is not None:
            return per_row_features(vis.llm_features[0], image_row, images_per_row)
        sync = next(iter(self.llm_sync.blocks.values())).sync
        p = self.visual.pos_proj.weight
        return p.new_zeros(batch, 0, sync.tokens_per_image, sync.value_dim)

    def decoder_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → the UNet's / VAE's input: resized, in [−1, 1]."""
        s = self.config.decoder.image_size
        return _resize(images, (s, s)) * 2 - 1

    # ----------------------------------------------------------------------- forward
    def forward(self, batch, *, generator: torch.Generator | None = None) -> MMInterleavedOutput:
        """Losses of a collated batch (module docstring).

        Args:
            batch: an [`InterleavedBatch`][mmlayers.data.collate.InterleavedBatch] on the model's device.
            generator: seeds the diffusion timesteps and noise and the context dropout
                (reproducible training); default the global RNG.

        Note:
            A few device→host copies size the per-row image stacks and pick the images
            that have context.
        """
        cfg, tok = self.config, self.config.tokens
        ids, labels = batch.input_ids, batch.labels
        m = int(batch.images.shape[0]) if batch.images.dim() == 4 else 0
        vis = self.encode_images(batch.images) if m else None
        hidden, logits = self._run_llm(ids, batch.attention_mask, vis, batch.image_row,
                                       batch.images_per_row)
        targets = labels[:, 1:].reshape(-1)
        count = int((targets != -100).sum())
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets,
                             ignore_index=-100, reduction="sum")
        text_loss = ce / max(count, 1)
        image_losses = hidden.new_zeros(m, dtype=torch.float32)
        image_loss = image_losses.sum()
        if m:
            ctx = image_contexts(hidden, ids, soi_id=tok.soi_id, bos_id=tok.bos_id,
                                 max_length=cfg.decoder.max_context,
                                 rule=cfg.loss.image_context_rule)
            if ctx.rows.numel() != m:
                raise ValueError(f"the batch has {m} images but {ctx.rows.numel()} <soi> tokens; "
                                 f"every <soi> must open an image in training batches")
            sel = ctx.has_context.nonzero().squeeze(1)
            if sel.numel():
                prev = batch.image_previous.to(sel.device)[sel]
                pyramid = vis.unet_features[0][prev.clamp(min=0)]
                spans = ctx.hidden_states[sel]
                if cfg.decoder.detach_context:
                    spans = spans.detach()
                ehs = self.context_encoder(spans, ctx.padding_mask[sel], generator=generator)
                target = self.decoder_images(batch.images[sel].to(ehs.device, ehs.dtype))
                per = diffusion_loss(self.unet, self.scheduler, encoder_hidden_states=ehs,
                                     images=target, vae=self.vae, synchronizer=self.unet_sync,
                                     pyramid=pyramid,
                                     has_image=(prev >= 0) & cfg.decoder.sync_previous_image,
                                     generator=generator)
                image_losses = image_losses.index_copy(0, sel, per)
                denom = m if cfg.loss.image_reduction == "all" else sel.numel()
                image_loss = per.sum() / denom
        loss = cfg.loss.text_weight * text_loss + cfg.loss.image_weight * image_loss
        return MMInterleavedOutput(loss, text_loss, image_loss, image_losses, logits, count)

    # ------------------------------------------------------------------- save / load
    def _skipped_prefixes(self) -> tuple[str, ...]:
        """Parts loaded from a directory and kept frozen: not written by default."""
        c, skip = self.config, []
        if c.llm.path is not None and c.llm.freeze:
            skip.append("llm.")
        if c.vision.path is not None and c.vision.freeze:
            skip.append("visual.vit.")
        if c.decoder.path is not None:
            skip.append("vae.")
            if c.decoder.freeze_unet:
                skip.append("unet.")
        return tuple(skip)

    def save_pretrained(self, directory: str | os.PathLike, *, full: bool = False) -> None:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer (if any).

        Args:
            full: write every weight. Default: leave out the frozen parts that were loaded
                from a local directory (LLM, ViT, VAE, frozen UNet); [`from_pretrained`][mmlayers.models.mm_interleaved.MMInterleaved.from_pretrained]
                loads them from there again.
            directory: where to write (created if missing).
        """
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        skip = () if full else self._skipped_prefixes()
        tensors, seen = {}, set()
        for k, v in self.state_dict().items():
            if k.startswith(skip):
                continue
            v = v.detach().cpu().contiguous()
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
            tensors[k] = v.clone() if ptr in seen else v
            seen.add(ptr)
        save_file(tensors, os.path.join(directory, _WEIGHTS), metadata={"skipped": json.dumps(skip)})
        self.config.save(os.path.join(directory, _CONFIG))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(os.path.join(directory, _TOKENIZER))

    @classmethod
    def from_official(cls, checkpoint: str | os.PathLike | dict, *, llm: str, vit: str, sd: str,
                      tokens: Any = None, dtype: torch.dtype | None = None,
                      image_size: int | None = None, **kwargs) -> MMInterleaved:
        """Build the official configuration from local component directories and load the
        released MM-Interleaved weights into it.

        The config is [`official_config`][mmlayers.models.official.official_config] (Q-Former
        resamplers, stored position tables, sizes read from the checkpoint); the weights go
        through [`convert_official_state_dict`][mmlayers.models.official.convert_official_state_dict]
        and every key is checked ([`load_converted_state_dict`][mmlayers.models.official.load_converted_state_dict]).
        The model keeps ``forward(batch, generator=...)`` and ``generate_images(...)``.

        Args:
            checkpoint: a ``.bin`` / ``.safetensors`` file, a directory of them (sharded with
                an ``*.index.json`` or not), or an official state dict.
            llm: local directory of the LLM (Vicuna-13B).
            vit: local directory of the CLIP ViT-L/14.
            sd: local Stable Diffusion 2.1-base directory.
            tokens: [`TokenConfig`][mmlayers.models.config.TokenConfig]; default ``<soi>``
                32000, ``<image>`` 32001.
            dtype: dtype to cast the loaded model to (position tables are loaded in float32
                first, then cast).
            image_size: the decoder's image side; default: the official 512.
            **kwargs: for [`from_config`][mmlayers.models.mm_interleaved.MMInterleaved.from_config]
                (e.g. ``tokenizer``).

        Returns:
            the model with the official weights.

        Raises:
            ValueError: an unreadable file, or a key that is unknown, missing or mis-shaped
                (named in the message).
        """
        from mmlayers.models.official import from_official

        return from_official(cls, checkpoint, llm=llm, vit=vit, sd=sd, tokens=tokens,
                             dtype=dtype, image_size=image_size, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> MMInterleaved:
        """Rebuild from [`save_pretrained`][mmlayers.models.mm_interleaved.MMInterleaved.save_pretrained] output (frozen parts from their own paths).

        Raises:
            ValueError: missing weights (other than parts loaded from their own directory)
                or unexpected ones.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        config = MMInterleavedConfig.load(os.path.join(directory, _CONFIG))
        tokenizer = None
        tok_dir = os.path.join(directory, _TOKENIZER)
        if os.path.isdir(tok_dir):
            require("transformers", "hf")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        model = cls.from_config(config, tokenizer=tokenizer, **kwargs)
        path = os.path.join(directory, _WEIGHTS)
        with safe_open(path, "pt") as f:
            skip = tuple(json.loads((f.metadata() or {}).get("skipped", "[]")))
        missing, unexpected = model.load_state_dict(load_file(path), strict=False)
        missing = [k for k in missing if not k.startswith(skip)]
        if missing or unexpected:
            raise ValueError(f"weights in {directory} do not fit the model built from its "
                             f"config: missing {missing[:8]}, unexpected {unexpected[:8]}")
        return model
