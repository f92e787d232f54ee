"""Drive a Hugging Face vision transformer one layer group at a time.

Shape key: b batch · t tokens (prefix + H·W patches) · d width · c,H,W image.

[`ViTBackbone`][mmlayers.layers.hf_vit.ViTBackbone] wraps a ``transformers`` vision model (CLIP, SigLIP, ViT, and any
model laid out the same way) and exposes what a ViT-Adapter needs: the patch
embedding, the encoder layers as a list that can be run in groups, and the final norm.
It only uses the modules' public ``forward``; it copies and patches nothing, and it does
not import ``transformers``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["UNSUPPORTED", "VERIFIED_TYPES", "ViTBackbone", "as_vit_backbone"]

_LAYER_PATHS = ("encoder.layers", "encoder.layer", "layers", "layer")

#: model_types whose layer-by-layer drive is tested against the model's own output; other
#: models are checked once at construction on a probe image (see ``ViTBackbone``).
VERIFIED_TYPES = frozenset({
    "clip_vision_model", "siglip_vision_model", "vit", "deit", "dinov2",
    "dinov2_with_registers", "beit", "data2vec-vision", "aimv2_vision_model",
    "chinese_clip_vision_model", "altclip_vision_model", "owlvit_vision_model"})

#: model_type → why the layer-by-layer drive cannot reproduce the model; such models are
#: refused by ``ViTBackbone`` at construction.
UNSUPPORTED: dict[str, str] = {
    "yolos": "its detection tokens come after the patch tokens and its mid-position "
             "embeddings are added between layers",
    "vit_mae": "its embeddings randomly shuffle and drop patches (even at mask_ratio=0)",
    "mlcd_vision_model": "its layers need rotary position_embeddings computed by the model",
    "idefics3_vision": "its embeddings need a patch_attention_mask (variable resolution)",
    "swin": "it is hierarchical (patch merging, windowed attention), not a plain ViT",
    "swinv2": "it is hierarchical (patch merging, windowed attention), not a plain ViT",
    "donut-swin": "it is hierarchical (patch merging, windowed attention), not a plain ViT",
    "maskformer-swin": "it is hierarchical (patch merging, windowed attention), not a plain ViT",
}


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


class ViTBackbone(nn.Module):
    """A Hugging Face ViT seen as ``embed → layers[0] … layers[L−1] → final_norm``.

    Supported layouts (``model`` or its ``vision_model`` attribute):

    - ``embeddings`` (pixels → tokens, with or without a CLS token),
    - optional ``pre_layrnorm`` (CLIP),
    - the layer list at ``encoder.layers``, ``encoder.layer``, ``layers`` or ``layer``,
    - a final norm on the last hidden state: ``layernorm`` (ViT, BEiT), ``post_layernorm``
      (SigLIP) or ``rms_norm`` (AIMv2). CLIP's ``post_layernorm`` only touches the pooled
      CLS token, so for CLIP the last hidden state is the raw encoder output, as in
      ``CLIPVisionModel``;
    - BEiT and Data2Vec-vision relative position biases: layers get the pixel
      ``resolution``, and a bias shared by all layers is computed once per call, as the
      models do; Data2Vec-vision's ``(tokens, grid)`` embedding output is unpacked.

    Together these reproduce the model's own ``last_hidden_state``: tested for the
    ``model_type`` values in ``VERIFIED_TYPES`` (CLIP, SigLIP, ViT, DeiT, DINOv2 with and
    without registers, BEiT, Data2Vec-vision, AIMv2, Chinese-CLIP, AltCLIP, OWL-ViT). Any
    other model is checked once at construction: one probe image (fixed seed, eval mode,
    no grad) goes through the model's own forward and through the layers; the model is
    refused unless they agree (which also decides whether ``post_layernorm`` is part of
    the last hidden state). Models on the meta device are not checked. Families known not
    to work are refused with the reason (``UNSUPPORTED``: YOLOS, ViT-MAE, MLCD, Idefics3
    vision), as is any hierarchical model (Swin and others with a ``depths`` list).
    ``num_prefix_tokens`` (CLS, distillation, register tokens) is read from the position
    table (+ ``register_tokens``) at construction; the pyramid and the tokenizer take the
    prefix as ``t − H·W`` of what ``embed`` actually returns.

    Args:
        model: the vision model, e.g. ``CLIPVisionModel``, ``SiglipVisionModel``,
            ``ViTModel`` (with ``add_pooling_layer`` irrelevant: the pooler is unused).

    Raises:
        TypeError: when the model lacks embeddings, a layer list or a config with
            ``hidden_size``, ``num_attention_heads``, ``image_size`` and ``patch_size``, is
            of a family listed in ``UNSUPPORTED`` or hierarchical, or (a model type not in
            ``VERIFIED_TYPES``) fails the probe-image check.

    Shapes:
        pixel_values (b, c, H·p, W·p) → last hidden state (b, t, d) with
        t = num_prefix_tokens + H·W.

    Examples:
        >>> import torch
        >>> from transformers import CLIPVisionConfig, CLIPVisionModel
        >>> from mmlayers.layers.hf_vit import ViTBackbone
        >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                        num_attention_heads=4, image_size=32, patch_size=8)
        >>> vit = ViTBackbone(CLIPVisionModel(cfg))
        >>> vit.grid_size, vit.num_prefix_tokens, vit.depth
        ((4, 4), 1, 2)
        >>> vit(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 17, 32])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, ViTBackbone):
            raise TypeError("model is already a ViTBackbone; use it directly")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        root = getattr(model, "vision_model", model)
        name = type(model).__name__
        config = getattr(root, "config", None) or getattr(model, "config", None)
        model_type = str(getattr(config, "model_type", ""))
        if model_type in UNSUPPORTED or isinstance(getattr(config, "depths", None), (list, tuple)):
            why = UNSUPPORTED.get(model_type, "it is hierarchical (a depths list), not a plain ViT")
            raise TypeError(
                f"{name} (model_type {model_type!r}) is not supported: {why}. Supported: "
                f"plain ViTs such as CLIP, SigLIP, ViT, DeiT, DINOv2, BEiT, Data2Vec-vision, "
                f"AIMv2")
        missing = [k for k in ("hidden_size", "num_attention_heads", "image_size", "patch_size")
                   if not hasattr(config, k)]
        if config is None or missing:
            raise TypeError(
                f"cannot drive {name}: expected a Hugging Face vision model whose config has "
                f"hidden_size, num_attention_heads, image_size and patch_size; missing {missing}"
            )
        embeddings = getattr(root, "embeddings", None)
        layers = next((m for p in _LAYER_PATHS if isinstance(m := _get(root, p), nn.ModuleList)), None)
        if embeddings is None or layers is None or len(layers) == 0:
            raise TypeError(
                f"cannot drive {name}: expected an `embeddings` module and a non-empty layer "
                f"list at one of {', '.join(_LAYER_PATHS)} (on the model or its `vision_model`)"
            )
        self._root_is_model = root is model
        self.hidden_size = int(config.hidden_size)
        self.num_heads = int(config.num_attention_heads)
        self.image_size = _pair(config.image_size)
        self.patch_size = _pair(config.patch_size)
        self.num_channels = int(getattr(config, "num_channels", 3))
        self.grid_size = (self.image_size[0] // self.patch_size[0],
                          self.image_size[1] // self.patch_size[1])
        self._pre_norm_name = next((n for n in ("pre_layrnorm", "pre_layernorm")
                                    if isinstance(getattr(root, n, None), nn.Module)), None)
        self._final_norm_name = None
        if isinstance(getattr(root, "layernorm", None), nn.Module):
            self._final_norm_name = "layernorm"
        elif isinstance(getattr(root, "post_layernorm", None), nn.Module) \
                and self._pre_norm_name is None:
            # SigLIP normalises every token; the CLIP family (the ones with a pre-norm)
            # applies post_layernorm to the pooled token only
            self._final_norm_name = "post_layernorm"
        elif isinstance(getattr(root, "rms_norm", None), nn.Module):  # AIMv2
            self._final_norm_name = "rms_norm"
        params = inspect.signature(type(layers[0]).forward).parameters
        self._layer_kwargs = {k: None for k in ("attention_mask", "causal_attention_mask")
                              if k in params and params[k].default is inspect.Parameter.empty}
        # BEiT / Data2Vec-vision: layers with a relative position bias need the pixel
        # resolution; a bias shared by all layers is computed once, as the model does
        if "resolution" in params:
            self._layer_kwargs["resolution"] = self.image_size
        self._shared_bias, self._shared_bias_arg = None, None
        encoder = getattr(root, "encoder", None)
        if getattr(root, "shared_position_bias", None) is not None:  # BEiT
            self._shared_bias, self._shared_bias_arg = "shared_position_bias", "attention_mask"
        elif getattr(encoder, "has_relative_position_bias", False):  # Data2Vec-vision
            self._shared_bias = "encoder.relative_position_bias"
            self._shared_bias_arg = "relative_position_bias"
        if self._shared_bias_arg is not None and self._shared_bias_arg not in params:
            raise TypeError(f"cannot drive {name}: it has a shared relative position bias but "
                            f"its layers take no {self._shared_bias_arg!r} argument")
        tokens = self._count_tokens(embeddings)
        self.num_prefix_tokens = tokens - self.grid_size[0] * self.grid_size[1]
        if self.num_prefix_tokens < 0:
            raise TypeError(f"cannot drive {name}: its embeddings give {tokens} tokens for a "
                            f"{self.grid_size} patch grid")
        if model_type not in VERIFIED_TYPES:
            self._verify(f"{name} (model_type {model_type!r})")

    @torch.no_grad()
    def _verify(self, what: str) -> None:
        """Refuse a model whose layer-by-layer drive does not give its own
        ``last_hidden_state`` on a probe image (skipped for parameters on the meta device)."""
        p = next(self.model.parameters(), None)
        if p is None or p.device.type == "meta":
            return
        probe = torch.rand(1, self.num_channels, *self.image_size,
                           generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            try:
                want = self.model(pixel_values=probe).last_hidden_state
            except Exception as e:  # noqa: BLE001 - any failure means it cannot be checked
                raise TypeError(f"{what} cannot be checked: its own forward(pixel_values=...) "
                                f"failed ({type(e).__name__}: {e}); only models tested "
                                f"({sorted(VERIFIED_TYPES)}) or checked on a probe image "
                                f"are accepted") from None
            try:
                hidden = self.run_layers(self.embed(probe))
            except Exception as e:  # noqa: BLE001
                raise TypeError(f"{what} is not supported: run layer by layer it fails "
                                f"({type(e).__name__}: {e})") from None
            got = self.final_norm(hidden)
            tol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 3e-2

            def close(a):
                return a.shape == want.shape and torch.allclose(
                    a.float(), want.float(), rtol=tol, atol=tol * float(want.abs().amax()) + tol)

            if not close(got) and isinstance(getattr(self.root, "post_layernorm", None),
                                             nn.Module):
                # a pre-norm and a post-norm on every token (e.g. GIT): try the other choice
                other = None if self._final_norm_name == "post_layernorm" else "post_layernorm"
                kept, self._final_norm_name = self._final_norm_name, other
                got = self.final_norm(hidden)
                if not close(got):
                    self._final_norm_name = kept
                    got = self.final_norm(hidden)
        finally:
            self.model.train(was_training)
        if not close(got):
            diff = (float((got.float() - want.float()).abs().amax())
                    if got.shape == want.shape else f"shapes {tuple(got.shape)} vs "
                                                     f"{tuple(want.shape)}")
            raise TypeError(f"{what} is not supported: run layer by layer it gives features "
                            f"that differ from its own last_hidden_state on a probe image "
                            f"(max |difference| {diff})")

    def _count_tokens(self, embeddings: nn.Module) -> int:
        registers = getattr(embeddings, "register_tokens", None)  # DINOv2 with registers
        extra = int(registers.shape[-2]) if isinstance(registers, torch.Tensor) else 0
        table = getattr(embeddings, "position_embeddings", None)
        if isinstance(table, torch.Tensor) and table.dim() >= 2:
            return int(table.shape[-2]) + extra
        table = getattr(embeddings, "position_embedding", None)
        if isinstance(table, nn.Embedding):
            return int(table.num_embeddings) + extra
        with torch.no_grad():  # no position table to read: embed one blank image
            probe = torch.zeros(1, self.num_channels, *self.image_size,
                                dtype=self._param_dtype(), device=self._param_device())
            try:
                out = embeddings(probe)
            except Exception as e:  # noqa: BLE001 - not an image embedding we can drive
                raise TypeError(f"cannot drive {type(self.model).__name__}: its embeddings do "
                                f"not take pixel values alone ({type(e).__name__}: {e})") from None
            return int((out[0] if isinstance(out, tuple) else out).shape[1])

    # -- pieces -------------------------------------------------------------------------
    @property
    def root(self) -> nn.Module:
        return self.model if self._root_is_model else self.model.vision_model

    @property
    def layers(self) -> nn.ModuleList:
        root = self.root
        return next(m for p in _LAYER_PATHS if isinstance(m := _get(root, p), nn.ModuleList))

    @property
    def depth(self) -> int:
        return len(self.layers)

    def _param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _param_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``pixel_values`` is (b, c, H·p, W·p) for this ViT."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have shape (b, c, H, W), got {tuple(pixel_values.shape)}")
        c, hh, ww = pixel_values.shape[1:]
        if c != self.num_channels:
            raise ValueError(f"pixel_values has {c} channels but the ViT expects {self.num_channels}")
        if (hh, ww) != self.image_size:
            raise ValueError(
                f"pixel_values is {hh}x{ww} px but the ViT expects {self.image_size[0]}x"
                f"{self.image_size[1]} ({self.grid_size[0]}x{self.grid_size[1]} patches of "
                f"{self.patch_size[0]}x{self.patch_size[1]}); resize the images first"
            )

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embedding (and CLIP's pre-norm): (b, c, H·p, W·p) → (b, t, d)."""
        self.check_pixels(pixel_values)
        root = self.root
        x = root.embeddings(pixel_values.to(self._param_dtype()))
        if isinstance(x, tuple):  # Data2Vec-vision: (tokens, patch grid)
            x = x[0]
        if self._pre_norm_name is not None:
            x = getattr(root, self._pre_norm_name)(x)
        return x

    def run_layers(self, hidden_states: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run layers ``start … end−1`` through their own ``forward``: (b, t, d) → (b, t, d)."""
        kwargs = dict(self._layer_kwargs)
        if self._shared_bias is not None:
            kwargs[self._shared_bias_arg] = _get(self.root, self._shared_bias)(
                self.grid_size, interpolate_pos_encoding=False, dim_size=hidden_states.shape[1])
        for layer in self.layers[start:end]:
            out = layer(hidden_states, **kwargs)
            hidden_states = out[0] if isinstance(out, tuple) else out
        return hidden_states

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The norm the model applies to its last hidden state (identity for CLIP)."""
        if self._final_norm_name is None:
            return hidden_states
        return getattr(self.root, self._final_norm_name)(hidden_states)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's ``last_hidden_state``: (b, c, H·p, W·p) → (b, t, d)."""
        return self.final_norm(self.run_layers(self.embed(pixel_values)))


def as_vit_backbone(vit: nn.Module) -> ViTBackbone:
    """Return ``vit`` if it is a [`ViTBackbone`][mmlayers.layers.hf_vit.ViTBackbone], else wrap it in one."""
    return vit if isinstance(vit, ViTBackbone) else ViTBackbone(vit)
