"""Builders: an [`MMInterleavedConfig`][mmlayers.models.config.MMInterleavedConfig] → the parts of the model.

Each part is loaded from a local directory (``local_files_only``, nothing is downloaded)
or built with random weights from its config dictionary. ``transformers`` and
``diffusers`` are imported here, when a builder is called.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from mmlayers._optional import require
from mmlayers.models.config import DecoderConfig, LLMConfig, MMInterleavedConfig, VisionConfig

__all__ = ["build_decoder", "build_llm", "build_scheduler", "build_visual",
           "zero_cross_attention"]

logger = logging.getLogger(__name__)


def _hf_config(config: dict, what: str):
    from transformers import AutoConfig

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{what}.config needs a 'model_type' (e.g. 'llama', "
                         f"'clip_vision_model') when no path is given; got keys {sorted(config)}")
    return AutoConfig.for_model(model_type, **cfg)


def build_llm(cfg: LLMConfig) -> nn.Module:
    """A causal LM: ``AutoModelForCausalLM.from_pretrained(path)`` or random from ``config``."""
    require("transformers", "hf")
    from transformers import AutoModelForCausalLM

    if cfg.path is not None:
        llm = AutoModelForCausalLM.from_pretrained(cfg.path, local_files_only=True)
    else:
        llm = AutoModelForCausalLM.from_config(_hf_config(cfg.config, "llm"))
    return llm  # gradient checkpointing is enabled by MMInterleaved, with the synchronizers


def build_visual(cfg: VisionConfig, *, llm_dim: int) -> nn.Module:
    """A [`VisualTokenizer`][mmlayers.vision.VisualTokenizer] (ViT frozen or not as ``cfg.freeze``)."""
    from mmlayers.vision import VisualTokenizer

    kw: dict[str, Any] = dict(
        llm_dim=llm_dim, pyramid=cfg.pyramid, pyramid_kwargs=dict(cfg.pyramid_kwargs),
        num_tokens=cfg.num_tokens, resampler_dim=cfg.resampler_dim,
        resampler_depth=cfg.resampler_depth, resampler_heads=cfg.resampler_heads,
        cross_every=cfg.cross_every, qk_norm=cfg.qk_norm, llm_levels=tuple(cfg.llm_levels),
        unet_levels=tuple(cfg.unet_levels), resampler=cfg.resampler,
        resampler_kwargs=dict(cfg.resampler_kwargs) or None, pos_table=cfg.pos_table)
    if cfg.path is not None:
        return VisualTokenizer.from_pretrained_vit(cfg.path, freeze_vit=cfg.freeze, **kw)
    return VisualTokenizer.from_config(_hf_config(cfg.config, "vision"), freeze_vit=cfg.freeze,
                                       **kw)


def build_scheduler(cfg: DecoderConfig, *, inference: bool = False):
    """The training scheduler (or the sampling one, same config, ``inference_scheduler``)."""
    diffusers = require("diffusers", "diffusion")

    if cfg.path is not None:
        base = diffusers.DDPMScheduler.from_pretrained(cfg.path, subfolder="scheduler",
                                                       local_files_only=True)
        config = dict(base.config)
        name = cfg.inference_scheduler if inference else type(base).__name__
    else:
        config = dict(cfg.scheduler)
        name = config.pop("class_name", "DDPMScheduler")
        if inference:
            name = cfg.inference_scheduler
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unknown diffusers scheduler {name!r}")
    return cls.from_config(config)


def _negative_from_text_encoder(path: str) -> torch.Tensor | None:
    enc_dir, tok_dir = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    if not (os.path.isdir(enc_dir) and os.path.isdir(tok_dir)):
        logger.info("no text_encoder/ and tokenizer/ in %s: negative embedding stays random", path)
        return None
    require("transformers", "diffusion")
    from transformers import AutoTokenizer, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    enc = CLIPTextModel.from_pretrained(enc_dir, local_files_only=True).eval()
    ids = tok("", padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return enc(ids).last_hidden_state


def build_decoder(cfg: DecoderConfig, *, context_dim: int, value_dim: int,
                  level_sizes: list[int], backend: str | None = None) -> dict[str, Any]:
    """UNet, optional VAE, schedulers, context encoder and attached UNet synchronizer.

    Returns:
        a dict with ``unet``, ``vae`` (or ``None``), ``scheduler``, ``inference_scheduler``,
        ``context_encoder`` and ``unet_sync``.
    """
    require("diffusers", "diffusion")
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from mmlayers.adapters.context import ImageContextEncoder
    from mmlayers.adapters.unet_sync import UNetSynchronizer

    vae = None
    if cfg.path is not None:
        unet = UNet2DConditionModel.from_pretrained(cfg.path, subfolder="unet",
                                                    local_files_only=True)
        if os.path.isdir(os.path.join(cfg.path, "vae")):
            vae = AutoencoderKL.from_pretrained(cfg.path, subfolder="vae", local_files_only=True)
    else:
        unet = UNet2DConditionModel(**cfg.unet)
        if cfg.zero_init_cross_attention:
            zero_cross_attention(unet)
        if cfg.vae is not None:
            vae = AutoencoderKL(**cfg.vae)
    _check_decoder_unet(unet)
    if vae is not None:
        vae.requires_grad_(False).eval()
    width = unet.config.cross_attention_dim
    width = width[0] if isinstance(width, (list, tuple)) else width
    encoder = ImageContextEncoder(context_dim=context_dim, out_dim=width,
                                  num_queries=cfg.context_queries, hidden_dim=cfg.context_hidden,
                                  depth=cfg.context_depth, num_heads=cfg.context_heads,
                                  uncond_prob=cfg.uncond_prob, resampler=cfg.context_resampler,
                                  pos_table=cfg.context_pos_table)
    if cfg.path is not None and cfg.init_negative_from_text_encoder:
        neg = _negative_from_text_encoder(cfg.path)
        if neg is not None:
            encoder.init_negative(neg)
    sync = UNetSynchronizer.for_unet(
        unet, value_dim=value_dim, dim=cfg.sync_dim, heads=cfg.sync_heads,
        points=cfg.sync_points, level_sizes=tuple(level_sizes), offset_init=cfg.sync_offset_init,
        max_images=cfg.sync_max_images, no_image=cfg.sync_no_image, backend=backend,
        pos_table=cfg.sync_pos_table)
    sync.attach(unet)
    if cfg.cross_attention_positions:
        from mmlayers.adapters.query_positions import add_cross_attention_positions

        add_cross_attention_positions(unet)
    return {"unet": unet, "vae": vae, "scheduler": build_scheduler(cfg),
            "inference_scheduler": build_scheduler(cfg, inference=True),
            "context_encoder": encoder, "unet_sync": sync}


def _check_decoder_unet(unet: nn.Module) -> None:
    """Refuse a UNet that reads inputs the decoder cannot give (it gives only the context
    tokens): SDXL's ``text_embeds`` / ``time_ids``, image embeddings, class labels."""
    from mmlayers.adapters.unet_inputs import unet_extra_inputs

    try:
        unet_extra_inputs(unet, 1)
    except ValueError as err:
        raise ValueError(
            f"MMInterleaved's image decoder conditions the UNet only on the context tokens, "
            f"but {err}. Use a UNet with addition_embed_type None or 'text' and no class "
            f"embedding, or drive this UNet with diffusion_loss / ImageGenerator directly "
            f"and pass those inputs") from None


@torch.no_grad()
def zero_cross_attention(unet: nn.Module) -> int:
    """Start every path from the context to a diffusers UNet's output at zero: the output
    projection of each cross-attention (``attn2``) and, with ``addition_embed_type="text"``,
    the final norm of the pooled context embedding added to the time embedding. Returns how
    many cross-attentions were zeroed."""
    count = 0
    for name, module in unet.named_modules():
        out = getattr(module, "to_out", None)
        if name.endswith("attn2") and out is not None:
            nn.init.zeros_(out[0].weight)
            if out[0].bias is not None:
                nn.init.zeros_(out[0].bias)
            count += 1
    pooled = getattr(unet, "add_embedding", None)
    if getattr(unet.config, "addition_embed_type", None) == "text" and pooled is not None:
        nn.init.zeros_(pooled.norm2.weight)
        nn.init.zeros_(pooled.norm2.bias)
    return count


def level_sides(visual: nn.Module, levels: list[int]) -> list[int]:
    """Square sides of the pyramid ``levels`` of a VisualTokenizer (raises if not square)."""
    info = visual.feature_info
    sides = []
    for i in levels:
        size = info[i].get("size")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if h != w:
            raise ValueError(f"pyramid level {i} is {h}x{w}; the synchronizers need square maps")
        sides.append(int(h))
    return sides


def resolve_config(config: MMInterleavedConfig | dict) -> MMInterleavedConfig:
    """Accept a config or its dict form."""
    if isinstance(config, dict):
        return MMInterleavedConfig.from_dict(config)
    if not isinstance(config, MMInterleavedConfig):
        raise TypeError(f"config must be an MMInterleavedConfig or a dict, got "
                        f"{type(config).__name__}")
    return config
