"""Extra conditioning inputs a diffusers UNet may need: ``added_cond_kwargs``, ``class_labels``.

Shape key: b images · d width.

Besides the noisy sample, the timestep and the context tokens (``encoder_hidden_states``),
some ``UNet2DConditionModel`` layouts read more inputs, chosen by their config:

- ``addition_embed_type=None`` or ``"text"``: nothing (``"text"`` pools the context
  tokens itself);
- ``addition_embed_type="text_time"`` (SDXL): ``added_cond_kwargs={"text_embeds": (b, D),
  "time_ids": (b, T)}`` with ``D + T·addition_time_embed_dim =
  projection_class_embeddings_input_dim``;
- ``addition_embed_type="image"``: ``{"image_embeds": (b, …)}``; ``"text_image"``: the
  same (``text_embeds`` optional); ``"image_hint"``: ``{"image_embeds", "hint"}``;
- ``encoder_hid_dim_type`` ending in ``image_proj``: ``{"image_embeds": …}``;
- ``class_embed_type`` or ``num_class_embeds`` set: ``class_labels`` (b,) (or (b, d) for
  the projection types).

MM-Interleaved's context encoder gives only ``encoder_hidden_states``; the rest comes from
the caller. For an SDXL-style UNet, for example, ``text_embeds`` can be a pooled context
vector (e.g. the mean of the context tokens through a trained Linear) and ``time_ids`` the
SDXL micro-conditioning ``(original H, original W, crop top, crop left, target H,
target W)`` of each image. [`unet_extra_inputs`][mmlayers.adapters.unet_inputs.unet_extra_inputs]
checks them against the UNet before any compute, so a missing input is a one-line error
that says what to pass instead of a failure deep inside diffusers.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["unet_extra_inputs"]

_NEEDS = {"text_time": ("text_embeds", "time_ids"), "image": ("image_embeds",),
          "text_image": ("image_embeds",), "image_hint": ("image_embeds", "hint")}
_READS = {"text_time": {"text_embeds", "time_ids"}, "image": {"image_embeds"},
          "text_image": {"image_embeds", "text_embeds"}, "image_hint": {"image_embeds", "hint"}}
_HID_IMAGE = ("text_image_proj", "image_proj", "ip_image_proj")


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def unet_extra_inputs(unet: nn.Module, batch: int, *,
                      added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
                      class_labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Check the extra inputs of ``unet`` (module docstring) and return them as keywords.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        batch: b, the batch of the sample they go with.
        added_cond_kwargs: name → (b, …) tensor, as diffusers' ``added_cond_kwargs``.
        class_labels: (b,) or (b, d) tensor.

    Returns:
        ``{"added_cond_kwargs": …, "class_labels": …}`` with only the inputs given (on the
        UNet's device; floating tensors in its dtype), to pass as
        ``unet(sample, t, encoder_hidden_states=…, **extra)``.

    Raises:
        ValueError: an input this UNet needs is missing (the message says what to pass),
            one it does not read is given, or a batch or width does not match.
        TypeError: an input is not a tensor (or a mapping of tensors).

    Examples:
        >>> import torch
        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel(
        ...     sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        ...     block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        ...     attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ...     addition_embed_type="text_time", addition_time_embed_dim=4,
        ...     projection_class_embeddings_input_dim=6 + 6 * 4)
        >>> extra = unet_extra_inputs(unet, 2, added_cond_kwargs={
        ...     "text_embeds": torch.randn(2, 6), "time_ids": torch.rand(2, 6) * 8})
        >>> sorted(extra["added_cond_kwargs"])
        ['text_embeds', 'time_ids']
        >>> try:
        ...     unet_extra_inputs(unet, 2)
        ... except ValueError as e:
        ...     print(str(e)[:78])
        this UNet has addition_embed_type='text_time' (SDXL-style) and needs added_con
    """
    cfg = getattr(unet, "config", None)
    if cfg is None:
        raise TypeError(f"unet must be a diffusers UNet2DConditionModel, got "
                        f"{type(unet).__name__}")
    kind = getattr(cfg, "addition_embed_type", None)
    hid = getattr(cfg, "encoder_hid_dim_type", None)
    needs = set(_NEEDS.get(kind, ())) | ({"image_embeds"} if hid in _HID_IMAGE else set())
    reads = set(_READS.get(kind, ())) | ({"image_embeds"} if hid in _HID_IMAGE else set())
    out: dict[str, Any] = {}
    given = {} if added_cond_kwargs is None else added_cond_kwargs
    if not isinstance(given, Mapping):
        raise TypeError(f"added_cond_kwargs must be a mapping of name → tensor, got "
                        f"{type(given).__name__}")
    missing = sorted(needs - set(given))
    if missing:
        if kind == "text_time":
            width = getattr(cfg, "projection_class_embeddings_input_dim", None)
            step = getattr(cfg, "addition_time_embed_dim", None)
            raise ValueError(
                f"this UNet has addition_embed_type='text_time' (SDXL-style) and needs "
                f"added_cond_kwargs={{'text_embeds': (b, D), 'time_ids': (b, T)}} with "
                f"D + T·{step} = {width} (projection_class_embeddings_input_dim); "
                f"missing {missing}. mmlayers' context gives only encoder_hidden_states: "
                f"pass them to diffusion_loss / ImageGenerator (e.g. a pooled context vector "
                f"and the SDXL size/crop ids)")
        raise ValueError(f"this UNet (addition_embed_type={kind!r}, encoder_hid_dim_type="
                         f"{hid!r}) needs added_cond_kwargs with {sorted(needs)}; missing "
                         f"{missing}")
    extra = sorted(set(given) - reads)
    if extra:
        raise ValueError(f"added_cond_kwargs {extra} are not read by this UNet "
                         f"(addition_embed_type={kind!r}, encoder_hid_dim_type={hid!r}; it "
                         f"reads {sorted(reads) or 'none'})")
    for name, value in given.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"added_cond_kwargs[{name!r}] must be a tensor, got "
                            f"{type(value).__name__}")
        if value.dim() < 1 or value.shape[0] != batch:
            raise ValueError(f"added_cond_kwargs[{name!r}] must have batch b={batch} first, "
                             f"got shape {_shape(value)}")
    if kind == "text_time":
        text, ids = given["text_embeds"], given["time_ids"]
        width = cfg.projection_class_embeddings_input_dim
        if text.dim() != 2 or ids.dim() != 2 or \
                text.shape[1] + ids.shape[1] * cfg.addition_time_embed_dim != width:
            raise ValueError(
                f"text_embeds {_shape(text)} and time_ids {_shape(ids)} must be (b, D) and "
                f"(b, T) with D + T·{cfg.addition_time_embed_dim} = {width} "
                f"(projection_class_embeddings_input_dim)")
    ref = next(unet.parameters())
    if given:
        out["added_cond_kwargs"] = {
            k: v.to(ref.device, ref.dtype if v.is_floating_point() else v.dtype)
            for k, v in given.items()}
    has_class = getattr(unet, "class_embedding", None) is not None
    if has_class and class_labels is None:
        raise ValueError(f"this UNet is class-conditioned (class_embed_type="
                         f"{getattr(cfg, 'class_embed_type', None)!r}, num_class_embeds="
                         f"{getattr(cfg, 'num_class_embeds', None)!r}): pass class_labels "
                         f"(b={batch},)")
    if class_labels is not None:
        if not has_class:
            raise ValueError("class_labels were given but this UNet has no class embedding "
                             "(class_embed_type and num_class_embeds are None)")
        if not isinstance(class_labels, torch.Tensor):
            raise TypeError(f"class_labels must be a tensor, got {type(class_labels).__name__}")
        if class_labels.dim() < 1 or class_labels.shape[0] != batch:
            raise ValueError(f"class_labels must have batch b={batch} first, got shape "
                             f"{_shape(class_labels)}")
        out["class_labels"] = class_labels.to(
            ref.device, ref.dtype if class_labels.is_floating_point() else class_labels.dtype)
    return out


def _check_conditional_unet(unet: nn.Module, user: str) -> None:
    """Refuse a UNet whose forward takes no ``encoder_hidden_states`` (e.g. diffusers'
    unconditional ``UNet2DModel``, whose up blocks also get the skips positionally)."""
    try:
        params = inspect.signature(unet.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return
    if "encoder_hidden_states" not in params:
        raise TypeError(f"{user} needs a diffusers UNet2DConditionModel (conditioned on "
                        f"encoder_hidden_states); {type(unet).__name__}.forward takes no "
                        f"encoder_hidden_states")


def _concat_extra(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Batch-concatenate two results of ``unet_extra_inputs`` (guidance's
    ``cat([unconditional, conditional])``)."""
    out: dict[str, Any] = {}
    a, c = first.get("added_cond_kwargs", {}), second.get("added_cond_kwargs", {})
    if a.keys() != c.keys():
        raise ValueError(f"negative_added_cond_kwargs has {sorted(a)} but added_cond_kwargs "
                         f"has {sorted(c)}; give both branches the same inputs")
    if c:
        out["added_cond_kwargs"] = {k: torch.cat([a[k].to(c[k]), c[k]]) for k in c}
    if "class_labels" in second:
        out["class_labels"] = torch.cat([first["class_labels"].to(second["class_labels"]),
                                         second["class_labels"]])
    return out
