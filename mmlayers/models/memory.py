"""Size a model before allocating it: build on the meta device, count parameters per part.

- [`build_on_meta`][mmlayers.models.memory.build_on_meta]: an [`MMInterleaved`][mmlayers.models.mm_interleaved.MMInterleaved] whose tensors live on
  PyTorch's ``meta`` device (shapes and dtypes, no storage), with the config's freezing
  applied. Parts given by a local ``path`` are sized from the directory's config files
  (``config.json``, ``unet/config.json``, ``vae/config.json``); no weight is read.
- [`parameter_report`][mmlayers.models.memory.parameter_report]: parameters per part (`PARTS`), total and trainable.

The paper-shaped model ([`MMInterleavedConfig.paper_13b_shapes`][mmlayers.models.config.MMInterleavedConfig.paper_13b_shapes]) builds on meta in seconds.
The meta model is for planning only: its schedulers' tables are meta tensors too.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from mmlayers.models.config import MMInterleavedConfig

__all__ = ["PARTS", "build_on_meta", "parameter_report"]

#: Report rows: part name → parameter-name prefixes of [`MMInterleaved`][mmlayers.MMInterleaved] (first match
#: wins; ``visual.`` after ``visual.vit.`` collects the pyramid, resampler and projections).
PARTS: dict[str, tuple[str, ...]] = {
    "llm": ("llm.",),
    "llm_synchronizers": ("llm_sync.",),
    "image_tokens": ("image_tokens.",),
    "vit": ("visual.vit.",),
    "pyramid_resampler": ("visual.",),
    "context_encoder": ("context_encoder.",),
    "unet": ("unet.",),
    "unet_synchronizers": ("unet_sync.",),
    "vae": ("vae.",),
}


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"no config file at {path!r}: a part given by path needs its "
                         f"config.json to be sized on the meta device")
    with open(path) as f:
        return json.load(f)


def _hf_dict(directory: str, vision: bool = False) -> dict:
    """A Hugging Face ``config.json`` → ``{"model_type": …, **kwargs}`` for random init."""
    data = _read_json(os.path.join(directory, "config.json"))
    if vision and "vision_config" in data:       # a full CLIP / SigLIP checkpoint
        sub = dict(data["vision_config"])
        sub.setdefault("model_type", data.get("model_type", "clip") + "_vision_model")
        data = sub
    return {k: v for k, v in data.items()
            if not k.startswith("_") and k not in ("architectures", "transformers_version")}


def _diffusers_dict(directory: str, sub: str) -> dict:
    data = _read_json(os.path.join(directory, sub, "config.json"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _without_paths(config: MMInterleavedConfig) -> MMInterleavedConfig:
    """The same config with every ``path`` replaced by the directory's config files."""
    cfg = copy.deepcopy(config)
    if cfg.llm.path is not None:
        cfg.llm.config, cfg.llm.path = _hf_dict(cfg.llm.path), None
    if cfg.vision.path is not None:
        cfg.vision.config, cfg.vision.path = _hf_dict(cfg.vision.path, vision=True), None
    dc = cfg.decoder
    if dc.path is not None:
        dc.unet = _diffusers_dict(dc.path, "unet")
        has_vae = os.path.isfile(os.path.join(dc.path, "vae", "config.json"))
        dc.vae = _diffusers_dict(dc.path, "vae") if has_vae else None
        sched = os.path.join(dc.path, "scheduler", "scheduler_config.json")
        if os.path.isfile(sched):
            dc.scheduler = {"class_name": "DDPMScheduler", **{
                k: v for k, v in _read_json(sched).items() if not k.startswith("_")
                and k not in ("skip_prk_steps", "set_alpha_to_one")}}
        dc.path, dc.zero_init_cross_attention = None, False
    return cfg


def build_on_meta(config: MMInterleavedConfig | dict, *, dtype: torch.dtype | None = None
                  ) -> nn.Module:
    """The model of ``config`` on the ``meta`` device: shapes only, no memory allocated.

    Args:
        config: an [`MMInterleavedConfig`][mmlayers.models.config.MMInterleavedConfig] (or its dict).
            Parts with a ``path`` are sized from the local config files found there.
        dtype: cast the parameters to this dtype (e.g. ``torch.bfloat16``) for byte counts.

    Returns:
        an [`MMInterleaved`][mmlayers.models.mm_interleaved.MMInterleaved] with every parameter on ``meta`` and
        ``requires_grad`` set by the config's freezing.

    Examples:
        >>> from mmlayers.models import MMInterleavedConfig
        >>> model = build_on_meta(MMInterleavedConfig.tiny(vocab_size=40))
        >>> {p.device.type for p in model.parameters()}
        {'meta'}
    """
    from mmlayers.models import builders
    from mmlayers.models.mm_interleaved import MMInterleaved

    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    cfg = _without_paths(builders.resolve_config(config))
    with torch.device("meta"):
        model = MMInterleaved.from_config(cfg)
    if dtype is not None:
        model.to(dtype)
    return model


def parameter_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Parameters per part of an [`MMInterleaved`][mmlayers.models.mm_interleaved.MMInterleaved] (meta or real).

    Returns:
        ``{part: {"total": n, "trainable": n_requires_grad, "bytes": n_bytes}}`` for every
        part of `PARTS` (absent parts, e.g. no VAE, count 0), an ``"other"`` row for
        parameters outside them and a ``"total"`` row. Shared parameters count once.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Examples:
        >>> from mmlayers.models import MMInterleavedConfig
        >>> report = parameter_report(build_on_meta(MMInterleavedConfig.tiny(vocab_size=40)))
        >>> parts = [r["total"] for k, r in report.items() if k != "total"]
        >>> report["total"]["total"] == sum(parts)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rows: dict[str, dict[str, int]] = {k: {"total": 0, "trainable": 0, "bytes": 0}
                                       for k in [*PARTS, "other", "total"]}
    for name, p in model.named_parameters():
        part = next((k for k, prefixes in PARTS.items() if name.startswith(prefixes)), "other")
        n = p.numel()
        for key in (part, "total"):
            rows[key]["total"] += n
            rows[key]["trainable"] += n if p.requires_grad else 0
            rows[key]["bytes"] += n * p.element_size()
    return rows

