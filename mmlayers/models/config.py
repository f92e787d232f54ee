"""MMInterleavedConfig: the nested, JSON-able description of a whole MM-Interleaved model.

Every part is either loaded from a local directory (``path``; nothing is downloaded) or
built with random weights from a config dictionary (``config``: keyword arguments of a
``transformers`` / ``diffusers`` config). Three presets:

- [`MMInterleavedConfig.tiny`][mmlayers.models.config.MMInterleavedConfig.tiny]: the CPU demo (4-layer Llama, 2-layer CLIP ViT at
  32 px, pixel-space 32-px UNet; everything random-init and trained);
- [`MMInterleavedConfig.paper_13b`][mmlayers.models.config.MMInterleavedConfig.paper_13b]: the paper's system (Vicuna-13B, CLIP ViT-L/14,
  SD-2.1-base) from local directories, with the paper's adapter sizes and freezing;
- [`MMInterleavedConfig.official_13b`][mmlayers.models.config.MMInterleavedConfig.official_13b]:
  the same system with the official modules where mmlayers' own choices differ (for the
  released weights).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["DecoderConfig", "LLMConfig", "LossConfig", "MMInterleavedConfig", "TokenConfig",
           "VisionConfig"]


@dataclass
class TokenConfig:
    """Token ids the model reads: ``<s>``, ``</s>``, padding, ``<soi>`` and ``<image>``."""

    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    soi_id: int = 4
    image_id: int = 5


@dataclass
class LLMConfig:
    """The language model and its feature synchronizers.

    Attributes:
        path: local Hugging Face directory of a causal LM; ``None``: random init from
            ``config`` (keyword arguments of ``AutoConfig.for_model``, with ``model_type``).
        freeze: keep the base LLM frozen (the synchronizers and image tokens always train).
        config: keyword arguments of ``AutoConfig.for_model`` (with ``model_type``) for a
            random-init LLM.
        sync_every: synchronizers in layers ``i % sync_every == 0`` (4 in the paper).
        sync_layers: explicit layer indices instead of ``sync_every``.
        sync_dim: synchronizer width; default: the pyramid width.
        sync_heads: synchronizer heads (16).
        sync_points: sampling points per head, level and image (8).
        sync_base_size: offset scale base (16).
        sync_offset_init: sampling-offset bias range (3.0).
        max_images: rows of the relative-image-position table (50).
        gradient_checkpointing: recompute decoder layers in backward.
        image_token_init_logit: initial logit of ``<soi>`` / ``<image>`` (−100 keeps a
            pretrained LLM's text generation unchanged; 0 for an LLM trained from scratch).
    """

    path: str | None = None
    config: dict = field(default_factory=dict)
    freeze: bool = True
    sync_every: int = 4
    sync_layers: list[int] | None = None
    sync_dim: int | None = None
    sync_heads: int = 16
    sync_points: int = 8
    sync_base_size: int = 16
    sync_offset_init: float = 3.0
    max_images: int = 50
    gradient_checkpointing: bool = False
    image_token_init_logit: float = -100.0


@dataclass
class VisionConfig:
    """ViT + pyramid + resampler ([`VisualTokenizer`][mmlayers.vision.VisualTokenizer]).

    Attributes:
        path: local directory of a CLIP / SigLIP / ViT model; ``None``: random init from
            ``config`` (with ``model_type``, e.g. ``"clip_vision_model"``).
        freeze: keep the ViT frozen (pyramid and resampler always train).
        config: keyword arguments of the random-init vision config (with ``model_type``).
        pyramid: ``"adapter"``, ``"simple"`` or ``None``.
        pyramid_kwargs: keyword arguments of that pyramid.
        num_tokens: visual tokens per image (``<image>`` slots, 64 in the paper).
        resampler_dim: resampler width (768).
        resampler_depth: resampler layers (12).
        resampler_heads: resampler heads (12).
        cross_every: cross-attention in every ``cross_every``-th resampler layer (2).
        qk_norm: LayerNorm on per-head queries and keys in the resampler.
        llm_levels: pyramid levels read by the LLM synchronizers.
        unet_levels: pyramid levels read by the UNet synchronizers.
        resampler: ``"perceiver"`` (pre-norm, default) or ``"qformer"`` (the official
            post-norm BLIP-2 Q-Former).
        resampler_kwargs: extra keyword arguments of the resampler class.
        pos_table: 2-D position tables of the resampler input and the pyramid levels:
            ``"exact"`` (default) or ``"official"`` (stored ``[y|x]`` table, bicubic resize).
    """

    path: str | None = None
    config: dict = field(default_factory=dict)
    freeze: bool = True
    pyramid: str | None = "adapter"
    pyramid_kwargs: dict = field(default_factory=dict)
    num_tokens: int = 64
    resampler_dim: int = 768
    resampler_depth: int = 12
    resampler_heads: int = 12
    cross_every: int = 2
    qk_norm: bool = True
    llm_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    unet_levels: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    resampler: str = "perceiver"
    resampler_kwargs: dict = field(default_factory=dict)
    pos_table: str = "exact"


@dataclass
class DecoderConfig:
    """Image decoder: context encoder, UNet (+ VAE), its synchronizers and scheduler.

    Attributes:
        path: local Stable Diffusion directory (``unet/``, ``vae/``, ``scheduler/`` and,
            for the negative embedding, ``text_encoder/`` + ``tokenizer/``); ``None``:
            random init from ``unet`` / ``vae`` / ``scheduler``.
        unet: ``UNet2DConditionModel`` keyword arguments (random init).
        vae: ``AutoencoderKL`` keyword arguments; ``None`` (and no ``path``): pixel space.
        scheduler: training scheduler, ``{"class_name": "DDPMScheduler", …kwargs}``.
        inference_scheduler: class name of the sampling scheduler (same config).
        num_inference_steps: default denoising steps (30 in the paper).
        guidance_scale: default classifier-free guidance scale (7.5 in the paper).
        freeze_unet: keep the UNet frozen.
        zero_init_cross_attention: for a random-init UNet, start every cross-attention
            output projection (and a pooled text embedding, ``addition_embed_type="text"``)
            at zero, so the UNet ignores the context until it learns to use it. Measured on
            the shapes demo's image decoder trained alone on a prompt's words, it kept the
            context encoder from learning to read them (no gradient reaches the encoder at
            first): asked colour 19 % after 800 steps with it, 96 % after 600 without.
        image_size: side of the images the UNet / VAE see (pixels).
        context_queries: output tokens of the [`ImageContextEncoder`][mmlayers.adapters.context.ImageContextEncoder] (77).
        context_hidden: its resampler width (1024).
        context_depth: its resampler layers (1).
        context_heads: its resampler heads (16).
        uncond_prob: share of training images whose context is replaced by the negative
            embedding (0.1).
        max_context: keep at most this many context tokens per image (those nearest its
            ``<soi>``); ``None``: all.
        detach_context: stop the diffusion loss's gradient at the LLM hidden states (the
            context encoder still trains). With an LLM trained from scratch, a context the
            UNet cannot use yet is otherwise pushed towards a constant (it collapses).
        init_negative_from_text_encoder: with ``path``, set the negative embedding to the
            text encoder's embedding of ``""``.
        sync_dim: width of the [`UNetSynchronizer`][mmlayers.adapters.unet_sync.UNetSynchronizer] blocks (1024).
        sync_heads: their heads (16).
        sync_points: their sampling points per head and level (8).
        sync_offset_init: their sampling-offset bias range (1.0).
        sync_max_images: their relative-position table rows (10).
        sync_no_image: what a block adds for an image with no previous image
            (``"official"``: the official constant; ``"zero"``: nothing).
        sync_previous_image: the UNet synchronizers read the preceding image's pyramid (the
            paper). ``False`` hides it (an ablation: with ``sync_no_image="zero"`` the
            synchronizers then add nothing).
        cross_attention_positions: add a fixed 2-D sine-cosine table to the queries of
            every UNet cross-attention
            ([`add_cross_attention_positions`][mmlayers.adapters.query_positions.add_cross_attention_positions]),
            so that the context can say where things go. Not in Stable Diffusion or the
            official decoder: off by default.
        context_resampler: the context encoder's resampler, ``"perceiver"`` (default) or
            ``"qformer"`` (the official post-norm BLIP-2 Q-Former).
        sync_pos_table: the UNet synchronizers' query position tables, ``"exact"``
            (default) or ``"official"`` (stored ``[y|x]`` table, bicubic resize).
        context_pos_table: the context encoder's 1-D position table, ``"exact"``
            (default) or ``"official"`` (the official float32 table).
    """

    path: str | None = None
    unet: dict = field(default_factory=dict)
    vae: dict | None = None
    scheduler: dict = field(default_factory=lambda: {"class_name": "DDPMScheduler"})
    inference_scheduler: str = "DDPMScheduler"
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    freeze_unet: bool = False
    zero_init_cross_attention: bool = False
    image_size: int = 512
    context_queries: int = 77
    context_hidden: int = 1024
    context_depth: int = 1
    context_heads: int = 16
    uncond_prob: float = 0.1
    max_context: int | None = None
    detach_context: bool = False
    init_negative_from_text_encoder: bool = True
    sync_dim: int = 1024
    sync_heads: int = 16
    sync_points: int = 8
    sync_offset_init: float = 1.0
    sync_max_images: int = 10
    sync_no_image: str = "official"
    sync_previous_image: bool = True
    cross_attention_positions: bool = False
    context_resampler: str = "perceiver"
    sync_pos_table: str = "exact"
    context_pos_table: str = "exact"


@dataclass
class LossConfig:
    """``text_weight · CE + image_weight · MSE``.

    Attributes:
        image_reduction: ``"all"`` averages the per-image MSE over every image of the batch,
            context-less ones counting as 0 (the official code); ``"context"`` over the
            images that have a context.
        image_context_rule: which images get a diffusion loss: ``"content"`` (default: a
            context with a token other than ``<s>`` / ``<soi>``) or ``"official"`` (a context
            longer than 2 tokens); see
            [`image_contexts`][mmlayers.adapters.context.image_contexts].
    """

    text_weight: float = 1.0
    image_weight: float = 10.0
    image_reduction: str = "all"
    image_context_rule: str = "content"


_PARTS = {"tokens": TokenConfig, "llm": LLMConfig, "vision": VisionConfig,
          "decoder": DecoderConfig, "loss": LossConfig}


@dataclass
class MMInterleavedConfig:
    """Everything needed to rebuild an [`MMInterleaved`][mmlayers.models.mm_interleaved.MMInterleaved].

    Examples:
        >>> cfg = MMInterleavedConfig.tiny(vocab_size=40)
        >>> cfg.llm.config["hidden_size"], cfg.vision.num_tokens, cfg.decoder.image_size
        (128, 8, 32)
        >>> MMInterleavedConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> p = MMInterleavedConfig.paper_13b("/m/vicuna", "/m/clip", "/m/sd21")
        >>> p.llm.freeze, p.llm.sync_every, p.vision.num_tokens, p.decoder.context_queries
        (True, 4, 64, 77)
    """

    tokens: TokenConfig = field(default_factory=TokenConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    backend: str | None = None

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able nested dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MMInterleavedConfig:
        """Inverse of [`to_dict`][mmlayers.models.config.MMInterleavedConfig.to_dict]; unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"expected a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MMInterleavedConfig keys {unknown}; expected {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            part = _PARTS.get(name)
            if part is not None and isinstance(value, dict):
                allowed = {f.name for f in fields(part)}
                bad = sorted(set(value) - allowed)
                if bad:
                    raise ValueError(f"unknown {name} keys {bad}; expected {sorted(allowed)}")
                value = part(**value)
            kwargs[name] = value
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MMInterleavedConfig:
        """Read a config written by [`save`][mmlayers.models.config.MMInterleavedConfig.save]."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    # -- presets -------------------------------------------------------------------------
    @classmethod
    def tiny(cls, *, vocab_size: int, tokens: TokenConfig | None = None,
             image_size: int = 32) -> MMInterleavedConfig:
        """The CPU demo model: every part random-init and trained (nothing is pretrained).

        Args:
            vocab_size: the tokenizer's vocabulary size (``len(tokenizer)``).
            tokens: token ids (default: [`word_level_tokenizer`][mmlayers.data.tokenizer.word_level_tokenizer]'s).
            image_size: image side in pixels (ViT input and UNet sample size).
        """
        tokens = tokens or TokenConfig()
        llm = LLMConfig(
            config={"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 128,
                    "intermediate_size": 256, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 4,
                    "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False, "bos_token_id": tokens.bos_id,
                    "eos_token_id": tokens.eos_id, "pad_token_id": tokens.pad_id},
            freeze=False, sync_every=2, sync_dim=64, sync_heads=4, sync_points=4,
            sync_base_size=8, max_images=16, image_token_init_logit=0.0)
        vision = VisionConfig(
            config={"model_type": "clip_vision_model", "hidden_size": 64,
                    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "image_size": image_size, "patch_size": 4},
            freeze=False, pyramid="simple", pyramid_kwargs={"out_dim": 64}, num_tokens=8,
            resampler_dim=64, resampler_depth=2, resampler_heads=4, cross_every=1,
            llm_levels=[1, 2, 3], unet_levels=[1, 2, 3])
        decoder = DecoderConfig(
            unet={"sample_size": image_size, "in_channels": 3, "out_channels": 3,
                  "layers_per_block": 1, "block_out_channels": [32, 64, 64],
                  "norm_num_groups": 8, "cross_attention_dim": 64, "attention_head_dim": 8,
                  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  "addition_embed_type": "text", "addition_embed_type_num_heads": 4},
            scheduler={"class_name": "DDPMScheduler", "num_train_timesteps": 1000,
                       "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
                       "clip_sample": True},
            inference_scheduler="DDIMScheduler", num_inference_steps=10, guidance_scale=4.0,
            freeze_unet=False, zero_init_cross_attention=True, image_size=image_size,
            context_queries=16, context_hidden=64,
            context_depth=1, context_heads=4, uncond_prob=0.1, detach_context=True,
            init_negative_from_text_encoder=False, sync_dim=32, sync_heads=2, sync_points=2,
            sync_max_images=4)
        return cls(tokens=tokens, llm=llm, vision=vision, decoder=decoder)

    @classmethod
    def paper_13b_shapes(cls, *, tokens: TokenConfig | None = None) -> MMInterleavedConfig:
        """[`paper_13b`][mmlayers.models.config.MMInterleavedConfig.paper_13b] at the paper's real shapes with random weights and no paths
        (speed and memory work: nothing is read from disk or downloaded).

        Vicuna-13B-shaped Llama (hidden 5120, 40 layers, 40 heads, MLP 13824, vocabulary
        32000; ``<soi>`` / ``<image>`` are the two extra rows of the image tokens), CLIP
        ViT-L/14-shaped vision tower (224 px, width 1024, 24 layers, 16 heads),
        SD-2.1-base-shaped UNet (channels 320, 640, 1280, 1280, cross-attention width 1024,
        head dims 5, 10, 20, 20, linear projections, 64² latents) and SD VAE (channels 128,
        256, 512, 512, 4 latent channels), SD-2.1's noise schedule (scaled-linear betas
        0.00085–0.012, ε prediction). Every other setting (synchronizers, adapter, resampler,
        context encoder, freezing, sampling) is [`paper_13b`][mmlayers.models.config.MMInterleavedConfig.paper_13b]'s.

        Examples:
            >>> c = MMInterleavedConfig.paper_13b_shapes()
            >>> c.llm.path, c.llm.config["hidden_size"], c.llm.config["num_hidden_layers"]
            (None, 5120, 40)
            >>> c.vision.config["patch_size"], c.decoder.unet["block_out_channels"]
            (14, [320, 640, 1280, 1280])
        """
        cfg = cls.paper_13b("", "", "", tokens=tokens)
        tok = cfg.tokens
        cfg.llm.path = cfg.vision.path = cfg.decoder.path = None
        cfg.llm.config = {
            "model_type": "llama", "vocab_size": 32000, "hidden_size": 5120,
            "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
            "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": tok.bos_id,
            "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        cfg.vision.config = {
            "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224,
            "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
        cfg.decoder.unet = {
            "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280], "norm_num_groups": 32,
            "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True, "flip_sin_to_cos": True, "freq_shift": 0,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                               "CrossAttnUpBlock2D"]}
        cfg.decoder.vae = {
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32,
            "sample_size": 512, "scaling_factor": 0.18215,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4}
        cfg.decoder.scheduler = {
            "class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
            "clip_sample": False, "steps_offset": 1}
        return cfg

    @classmethod
    def paper_13b(cls, llm_path: str, vit_path: str, sd_path: str, *,
                  tokens: TokenConfig | None = None) -> MMInterleavedConfig:
        """MM-Interleaved as in the paper, from local directories (nothing is downloaded).

        Vicuna-13B (frozen; synchronizers in every 4th layer, 16 heads, 8 points, levels
        32², 16², 8², base 16), CLIP ViT-L/14 at 224 px (frozen) with ViT-Adapter and a
        64-query, 12-layer resampler, SD-2.1-base UNet (trained, lr 1e-5 in the recipe) with
        a 77-query context encoder and UNet synchronizers on a 64/32/16/8 pyramid; DDPM,
        30 steps, guidance 7.5. ``tokens`` default to a Llama tokenizer after
        [`ensure_image_tokens`][mmlayers.data.tokenizer.ensure_image_tokens] (``<soi>`` 32000, ``<image>`` 32001).
        """
        tokens = tokens or TokenConfig(bos_id=1, eos_id=2, pad_id=0, soi_id=32000,
                                       image_id=32001)
        return cls(
            tokens=tokens,
            llm=LLMConfig(path=llm_path, freeze=True, sync_every=4, sync_dim=1024,
                          sync_heads=16, sync_points=8, sync_base_size=16,
                          sync_offset_init=3.0, max_images=50),
            vision=VisionConfig(path=vit_path, freeze=True, pyramid="adapter", num_tokens=64,
                                resampler_dim=768, resampler_depth=12, resampler_heads=12,
                                cross_every=2, llm_levels=[1, 2, 3], unet_levels=[0, 1, 2, 3]),
            decoder=DecoderConfig(path=sd_path, inference_scheduler="DDPMScheduler",
                                  num_inference_steps=30, guidance_scale=7.5, freeze_unet=False,
                                  image_size=512, context_queries=77, context_hidden=1024,
                                  context_depth=1, context_heads=16, uncond_prob=0.1,
                                  sync_dim=1024, sync_heads=16, sync_points=8,
                                  sync_offset_init=1.0, sync_max_images=10))

    @classmethod
    def official_13b(cls, llm_path: str, vit_path: str, sd_path: str, *,
                     tokens: TokenConfig | None = None) -> MMInterleavedConfig:
        """The official MM-Interleaved configuration: ``paper_13b`` with the official
        modules wherever mmlayers' defaults differ.

        - resamplers: post-norm BLIP-2 Q-Formers (``"qformer"``; ours: pre-norm perceivers);
        - 2-D position tables: the stored ``[y|x]`` float32 tables, resized bicubically
          (ours: the exact formula, ``[x|y]``); the context's 1-D table in float32;
        - ViT-Adapter spatial-prior LayerNorm eps 1e-6 (ours 1e-5);
        - LLM synchronizer value width: the ViT's (the builder's default);
        - diffusion loss only for contexts longer than 2 tokens (``image_context_rule``).

        [`MMInterleaved.from_official`][mmlayers.models.mm_interleaved.MMInterleaved.from_official]
        uses it (with sizes read from the checkpoint) to load the released weights.

        Args:
            llm_path: local LLM directory (Vicuna-13B).
            vit_path: local CLIP ViT-L/14 directory.
            sd_path: local Stable Diffusion 2.1-base directory.
            tokens: token ids; default ``<soi>`` 32000, ``<image>`` 32001.

        Returns:
            the config.

        Examples:
            >>> cfg = MMInterleavedConfig.official_13b("llm", "vit", "sd")
            >>> cfg.vision.resampler, cfg.decoder.sync_pos_table, cfg.loss.image_context_rule
            ('qformer', 'official', 'official')
        """
        from mmlayers.models.official import official_config

        return official_config(llm_path, vit_path, sd_path, tokens=tokens)
