"""Visual tokenizer: images → LLM tokens + a multi-scale feature pyramid.

Shape key: b images · n visual tokens · t ViT tokens (prefix + H·W) · l levels ·
s flattened pyramid tokens · d ViT width · c,H,W image.

MM-Interleaved sees every image twice: as ``num_tokens`` (64) embeddings placed in the
LLM's sequence, and as a pyramid of feature maps that the feature synchronizers sample
(levels 1–3 for the LLM, 0–3 for the UNet). [`VisualTokenizer`][mmlayers.vision.VisualTokenizer] composes a frozen
Hugging Face ViT, an optional trainable pyramid and a trainable perceiver resampler::

    x      = (images − mean) / std                    images in [0, 1]
    hidden, levels = pyramid(x, vit)                  (or hidden = vit(x), levels = [])
    ctx    = post_norm(pos_norm(pos_proj(hidden)) + sincos_2d(grid))   prefix rows get 0
    tokens = resampler(ctx)                           (b, n, llm_dim)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from mmlayers._optional import require
from mmlayers.layers.hf_vit import as_vit_backbone
from mmlayers.layers.posembed import (
    accept_stored_table,
    official_sincos_2d,
    resize_pos_table,
    sincos_2d,
)
from mmlayers.layers.pyramid import SimpleFeaturePyramid, ViTAdapterPyramid
from mmlayers.layers.qformer import QFormerResampler
from mmlayers.layers.resampler import PerceiverResampler

__all__ = ["CLIP_MEAN", "CLIP_STD", "VisualTokenizer", "VisualTokenizerOutput", "flatten_levels"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def flatten_levels(levels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Concatenate maps (b, d, H_l, W_l) into (b, s, d), s = Σ_l H_l·W_l, rows first,
    and return their spatial shapes (the layout the deformable-attention op expects)."""
    if not levels:
        raise ValueError("flatten_levels needs at least one level")
    shapes = [(int(m.shape[-2]), int(m.shape[-1])) for m in levels]
    flat = torch.cat([rearrange(m, "b d H W -> b (H W) d") for m in levels], dim=1)
    return flat, shapes


@dataclass
class VisualTokenizerOutput:
    """What [`VisualTokenizer`][mmlayers.vision.VisualTokenizer] returns.

    Attributes:
        tokens: (b, n, llm_dim) embeddings for the LLM's image slots.
        pyramid: l maps (b, d, H_l, W_l), finest first (empty without a pyramid).
        last_hidden_state: (b, t, d) the (adapted) ViT's last hidden state.
        llm_levels: pyramid levels read by the LLM.
        unet_levels: pyramid levels read by the UNet.
    """

    tokens: torch.Tensor
    pyramid: list[torch.Tensor]
    last_hidden_state: torch.Tensor
    llm_levels: tuple[int, ...] = ()
    unet_levels: tuple[int, ...] = ()

    def flatten(self, levels: Sequence[int] | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Levels ``levels`` (default all) as ((b, s, d), spatial shapes)."""
        idx = range(len(self.pyramid)) if levels is None else levels
        bad = [i for i in idx if not -len(self.pyramid) <= i < len(self.pyramid)]
        if bad:
            raise ValueError(f"levels {bad} out of range for a {len(self.pyramid)}-level pyramid")
        return flatten_levels([self.pyramid[i] for i in idx])

    @property
    def llm_features(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The LLM synchronizer's value input: ((b, s, d), shapes) of ``llm_levels``."""
        return self.flatten(self.llm_levels)

    @property
    def unet_features(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The UNet synchronizer's value input: ((b, s, d), shapes) of ``unet_levels``."""
        return self.flatten(self.unet_levels)


class VisualTokenizer(nn.Module):
    """Frozen ViT (+ trainable pyramid) + trainable perceiver resampler (module docstring).

    The constructor freezes nothing; [`freeze_vit`][mmlayers.vision.VisualTokenizer.freeze_vit] does (the builders
    [`from_config`][mmlayers.vision.VisualTokenizer.from_config] and [`from_pretrained_vit`][mmlayers.vision.VisualTokenizer.from_pretrained_vit] call it by default).

    Args:
        vit: a Hugging Face vision model (``CLIPVisionModel``, ``SiglipVisionModel``,
            ``ViTModel``, …) or a [`ViTBackbone`][mmlayers.layers.hf_vit.ViTBackbone].
        llm_dim: width of the output tokens.
        pyramid: ``"adapter"`` ([`ViTAdapterPyramid`][mmlayers.layers.pyramid.ViTAdapterPyramid]), ``"simple"``
            ([`SimpleFeaturePyramid`][mmlayers.layers.pyramid.SimpleFeaturePyramid]) or ``None``.
        pyramid_kwargs: extra keyword arguments for the pyramid.
        num_tokens: resampler queries n (64).
        resampler_dim: resampler width (768 in MM-Interleaved).
        resampler_depth: resampler layers (12).
        resampler_heads: resampler heads (12).
        cross_every: cross-attention in every ``cross_every``-th resampler layer (2).
        qk_norm: LayerNorm on per-head queries and keys (True).
        llm_levels: pyramid levels for the LLM ((1, 2, 3)).
        unet_levels: pyramid levels for the UNet ((0, 1, 2, 3)).
        image_mean: per-channel normalisation mean (CLIP's by default).
        image_std: per-channel normalisation standard deviation (CLIP's by default).
        pos_table: 2-D position tables of the resampler input and (unless
            ``pyramid_kwargs`` says otherwise) of the pyramid levels: ``"exact"`` (default,
            [`sincos_2d`][mmlayers.layers.posembed.sincos_2d], not saved) or ``"official"`` (the
            official stored ``[y|x]`` float32 table, a persistent buffer ``pos_embed``
            of shape (H·W, d) that loads from a checkpoint; levels resize theirs bicubically).
        resampler: ``"perceiver"`` (default, pre-norm
            [`PerceiverResampler`][mmlayers.layers.resampler.PerceiverResampler]) or
            ``"qformer"`` (the official post-norm BLIP-2 Q-Former,
            [`QFormerResampler`][mmlayers.layers.qformer.QFormerResampler];
            ``resampler.proj`` is the official ``visual_tokenizer.proj``).
        resampler_kwargs: extra keyword arguments of the resampler class (e.g. ``mlp_dim``,
            ``dropout`` of the Q-Former).
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Shapes:
        images (b, c, H·p, W·p) in [0, 1] → [`VisualTokenizerOutput`][mmlayers.vision.VisualTokenizerOutput].

    Examples:
        >>> import torch
        >>> from transformers import CLIPVisionConfig
        >>> from mmlayers.vision import VisualTokenizer
        >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        ...                        num_attention_heads=4, image_size=32, patch_size=8)
        >>> tok = VisualTokenizer.from_config(cfg, llm_dim=48, num_tokens=8, resampler_dim=32,
        ...                                   resampler_depth=2, resampler_heads=4,
        ...                                   pyramid_kwargs={"inplanes": 8})
        >>> out = tok(torch.rand(2, 3, 32, 32))
        >>> tuple(out.tokens.shape), [tuple(m.shape[-2:]) for m in out.pyramid]
        ((2, 8, 48), [(16, 16), (8, 8), (4, 4), (2, 2)])
        >>> feats, shapes = out.llm_features
        >>> tuple(feats.shape), shapes
        ((2, 84, 32), [(8, 8), (4, 4), (2, 2)])
    """

    def __init__(self, vit: nn.Module, *, llm_dim: int, pyramid: str | None = "adapter",
                 pyramid_kwargs: dict | None = None, num_tokens: int = 64,
                 resampler_dim: int = 768, resampler_depth: int = 12, resampler_heads: int = 12,
                 cross_every: int = 2, qk_norm: bool = True,
                 llm_levels: Sequence[int] = (1, 2, 3), unet_levels: Sequence[int] = (0, 1, 2, 3),
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD,
                 pos_table: str = "exact", resampler: str = "perceiver",
                 resampler_kwargs: dict | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if pos_table not in ("exact", "official"):
            raise ValueError(f"pos_table must be 'exact' or 'official', got {pos_table!r}")
        if resampler not in ("perceiver", "qformer"):
            raise ValueError(f"resampler must be 'perceiver' or 'qformer', got {resampler!r}")
        self.vit = as_vit_backbone(vit)
        d, grid = self.vit.hidden_size, self.vit.grid_size
        if len(image_mean) != self.vit.num_channels or len(image_std) != self.vit.num_channels:
            raise ValueError(f"image_mean and image_std need {self.vit.num_channels} values (one per "
                             f"channel), got {len(image_mean)} and {len(image_std)}")
        if any(s <= 0 for s in image_std):
            raise ValueError(f"image_std must be positive, got {tuple(image_std)}")
        kw = {"device": device, "dtype": dtype}
        pkw = dict(pyramid_kwargs or {})
        if pyramid is not None:
            pkw.setdefault("pos_table", pos_table)
        if pyramid == "adapter":
            self.pyramid = ViTAdapterPyramid.from_vit(self.vit, **{**kw, **pkw})
        elif pyramid == "simple":
            self.pyramid = SimpleFeaturePyramid(d, grid_size=grid, **kw, **pkw)
        elif pyramid is None:
            self.pyramid = None
        else:
            raise ValueError(f"pyramid must be 'adapter', 'simple' or None, got {pyramid!r}")
        num_levels = len(self.pyramid.feature_info) if self.pyramid is not None else 0
        for name, lv in (("llm_levels", llm_levels), ("unet_levels", unet_levels)):
            if self.pyramid is not None and any(not 0 <= i < num_levels for i in lv):
                raise ValueError(f"{name} must index the {num_levels} pyramid levels, got {tuple(lv)}")
        self.llm_levels = tuple(llm_levels) if self.pyramid is not None else ()
        self.unet_levels = tuple(unet_levels) if self.pyramid is not None else ()
        self.pos_proj = nn.Linear(d, d, **kw)
        self.pos_norm = nn.LayerNorm(d, eps=1e-6, **kw)
        self.post_norm = nn.LayerNorm(d, eps=1e-6, **kw)
        if pos_table == "official":  # stored [y|x] table, loadable from a checkpoint
            if grid[0] != grid[1]:
                raise ValueError(f"pos_table='official' needs a square ViT grid, got {grid}")
            self.register_buffer("pos_embed", official_sincos_2d(grid[0], d).to(device))
            accept_stored_table(self, "pos_embed")  # e.g. the official fixed 16 × 16 table
        else:
            self.register_buffer("pos_embed", sincos_2d(grid[0], grid[1], d, device=device),
                                 persistent=False)
        self.pos_table = pos_table
        self.resampler = (QFormerResampler if resampler == "qformer" else PerceiverResampler)(
            dim=resampler_dim, num_queries=num_tokens, depth=resampler_depth,
            cross_every=cross_every, context_dim=d, num_heads=resampler_heads, out_dim=llm_dim,
            out_init_std=1e-3, qk_norm=qk_norm, **(resampler_kwargs or {}), **kw)
        self.register_buffer("image_mean", torch.tensor(image_mean, device=device).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, device=device).view(-1, 1, 1),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset the new layers (not the ViT): pos projection trunc-normal(0.02), norms."""
        nn.init.trunc_normal_(self.pos_proj.weight, std=0.02)
        nn.init.zeros_(self.pos_proj.bias)
        self.pos_norm.reset_parameters()
        self.post_norm.reset_parameters()

    # -- builders and training policy ------------------------------------------------
    @classmethod
    def from_config(cls, config, *, freeze_vit: bool = True, **kwargs) -> VisualTokenizer:
        """Build a randomly initialised ViT from a ``transformers`` vision config
        (``CLIPVisionConfig``, ``SiglipVisionConfig``, ``ViTConfig``) and wrap it."""
        require("transformers", "hf")
        from transformers import AutoModel

        model = cls(AutoModel.from_config(config), **kwargs)
        return model.freeze_vit() if freeze_vit else model

    @classmethod
    def from_pretrained_vit(cls, path: str, *, model_cls: type | None = None,
                            freeze_vit: bool = True, **kwargs) -> VisualTokenizer:
        """Load the ViT from a local directory (no downloads) and wrap it.

        A full CLIP / SigLIP checkpoint directory loads its vision tower
        (``CLIPVisionModel`` / ``SiglipVisionModel``); other models load through
        ``AutoModel``. ``model_cls`` forces a class.
        """
        transformers = require("transformers", "hf")

        if model_cls is None:
            model_type = transformers.AutoConfig.from_pretrained(path, local_files_only=True).model_type
            towers = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
                      "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"}
            model_cls = getattr(transformers, towers.get(model_type, "AutoModel"))
        vit = model_cls.from_pretrained(path, local_files_only=True)
        model = cls(vit, **kwargs)
        return model.freeze_vit() if freeze_vit else model

    def freeze_vit(self, frozen: bool = True) -> VisualTokenizer:
        """ViT parameters get ``requires_grad = not frozen``; every other parameter
        (pyramid, resampler, projections) is made trainable. Returns ``self``."""
        for name, p in self.named_parameters():
            p.requires_grad_(not frozen if name.startswith("vit.") else True)
        return self

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs with ``requires_grad``."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    @property
    def feature_info(self) -> list[dict]:
        """The pyramid's ``feature_info`` (empty without a pyramid)."""
        return self.pyramid.feature_info if self.pyramid is not None else []

    def resampler_context(self, hidden: torch.Tensor) -> torch.Tensor:
        """ViT last hidden state (b, t, d) → resampler input (b, t, d):
        ``post_norm(pos_norm(pos_proj(hidden)) + sincos_2d)``, prefix rows get no position."""
        pos = self.pos_embed
        if self.pos_table == "official":  # a stored table of another grid is resized
            pos = resize_pos_table(pos, self.vit.grid_size)
        pos = pos.to(hidden.dtype)
        pos = torch.cat([pos.new_zeros(hidden.shape[1] - pos.shape[0], pos.shape[1]), pos])
        return self.post_norm(self.pos_norm(self.pos_proj(hidden)) + pos)

    # -- forward -----------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> VisualTokenizerOutput:
        """images (b, c, H·p, W·p) in [0, 1] → [`VisualTokenizerOutput`][mmlayers.vision.VisualTokenizerOutput]."""
        self.vit.check_pixels(images)
        x = (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)
        if isinstance(self.pyramid, ViTAdapterPyramid):
            hidden, levels = self.pyramid(x, self.vit)
        else:
            hidden = self.vit(x)
            levels = []
            if self.pyramid is not None:
                h, w = self.vit.grid_size
                patches = hidden[:, hidden.shape[1] - h * w:]
                levels = self.pyramid(rearrange(patches, "b (H W) d -> b d H W", H=h))
        hidden = hidden.to(self.pos_proj.weight.dtype)
        tokens = self.resampler(self.resampler_context(hidden))
        return VisualTokenizerOutput(tokens, levels, hidden, self.llm_levels, self.unet_levels)

