"""2-D positions for the queries of a diffusers UNet's cross-attention (optional).

Shape key: b batch · n = H·W query pixels · s context tokens · c query width.

A UNet's cross-attention reads its context with queries made from each pixel's features,
which carry no explicit position: a convolutional UNet only infers where a pixel is from
the zero padding at the borders. A prompt that says *where* something goes ("a circle on
the left") then has to be learned through that weak signal. This adapter adds a fixed 2-D
sine-cosine table to the cross-attention queries, so that a context token can address
pixels by position from the first step::

    q = to_q(norm(x) + sincos_2d(H, W, c; frame = sample_size²))   # keys, values unchanged

It is not part of Stable Diffusion or of the official MM-Interleaved decoder, and is off
by default (``DecoderConfig.cross_attention_positions``). The demo's tiny pixel-space
UNet, trained from scratch for a few minutes, uses it. Pretrained SD weights were trained
without it: do not switch it on for them unless you fine-tune.

How it enters the UNet (public APIs only): a forward pre-hook on each
``Transformer2DModel`` records the feature map's ``(H, W)``, and the cross-attention
(``attn2``) of each of its transformer blocks gets a processor that wraps the one it had
and adds the table to the query input. Self-attention is untouched. `remove`
restores the original processors and takes the hooks off.
"""

from __future__ import annotations

import torch
from torch import nn

from mmlayers._optional import require
from mmlayers.layers.posembed import sincos_2d

__all__ = ["CrossAttentionPositions", "add_cross_attention_positions"]


class _Frame:
    """The (H, W) of the feature map a transformer model is processing (set by a hook)."""

    def __init__(self) -> None:
        self.hw: tuple[int, int] | None = None

    def __call__(self, module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        self.hw = (int(x.shape[-2]), int(x.shape[-1])) if x is not None and x.dim() == 4 \
            else None


class _PositionalProcessor:
    """Wraps an attention processor: adds the sincos table to the query input."""

    def __init__(self, inner, frame: _Frame, base_size: tuple[int, int]) -> None:
        self.inner, self.frame, self.base_size = inner, frame, base_size
        self._cache: dict = {}

    def table(self, h: int, w: int, c: int, like: torch.Tensor) -> torch.Tensor:
        key = (h, w, c, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = sincos_2d(h, w, c, base_size=self.base_size,
                                         device=like.device, dtype=like.dtype)
        return self._cache[key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None and hidden_states.dim() == 3:
            if self.frame.hw is None:
                raise RuntimeError("cross-attention positions: the feature map size is unknown "
                                   "(the attention was called outside its Transformer2DModel)")
            h, w = self.frame.hw
            if h * w != hidden_states.shape[1]:
                raise RuntimeError(f"cross-attention positions: {hidden_states.shape[1]} query "
                                   f"tokens do not form the recorded {h}×{w} map")
            hidden_states = hidden_states + self.table(h, w, hidden_states.shape[-1],
                                                       hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


class CrossAttentionPositions:
    """Handle of `add_cross_attention_positions`; `remove` undoes it.

    Attributes:
        unet: the UNet it is attached to.
        num_attentions: how many cross-attention layers got positions.
    """

    def __init__(self, unet: nn.Module, base_size: tuple[int, int]) -> None:
        require("diffusers", "diffusion")
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        self.unet, self.base_size = unet, base_size
        self._hooks: list = []
        self._restore: list = []
        for module in unet.modules():
            if not isinstance(module, Transformer2DModel):
                continue
            frame = _Frame()
            self._hooks.append(module.register_forward_pre_hook(frame, with_kwargs=True))
            for block in module.modules():
                attn = getattr(block, "attn2", None)
                if attn is None or not hasattr(attn, "set_processor"):
                    continue
                old = attn.processor
                self._restore.append((attn, old))
                attn.set_processor(_PositionalProcessor(old, frame, base_size))
        self.num_attentions = len(self._restore)

    def remove(self) -> None:
        """Restore every wrapped processor and take the hooks off (idempotent)."""
        for h in self._hooks:
            h.remove()
        for attn, old in self._restore:
            attn.set_processor(old)
        self._hooks, self._restore = [], []


def add_cross_attention_positions(unet: nn.Module) -> CrossAttentionPositions:
    """Give every cross-attention of ``unet`` 2-D sine-cosine query positions.

    Coordinates are measured in cells of the UNet's ``sample_size`` grid at every level, so
    that one point of the image has the same position code at every resolution (a level of
    side ``H`` steps ``sample_size / H`` cells per pixel).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any module holding
            ``Transformer2DModel`` blocks and a ``config.sample_size``).

    Returns:
        a [`CrossAttentionPositions`][mmlayers.adapters.query_positions.CrossAttentionPositions]
        handle; ``handle.remove()`` restores the UNet.

    Raises:
        ValueError: the UNet has no cross-attention to attach to.

    Examples:
        >>> import torch
        >>> from diffusers import UNet2DConditionModel
        >>> from mmlayers.adapters.query_positions import add_cross_attention_positions
        >>> unet = UNet2DConditionModel(
        ...     sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        ...     block_out_channels=[8, 16], norm_num_groups=4, cross_attention_dim=8,
        ...     attention_head_dim=4,
        ...     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        ...     up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
        >>> handle = add_cross_attention_positions(unet)
        >>> handle.num_attentions  # one down, two up (layers_per_block + 1), one mid
        4
        >>> x, ctx = torch.randn(1, 3, 8, 8), torch.randn(1, 5, 8)
        >>> unet(x, 10, encoder_hidden_states=ctx).sample.shape
        torch.Size([1, 3, 8, 8])
        >>> handle.remove()
    """
    size = getattr(getattr(unet, "config", None), "sample_size", None)
    if size is None:
        raise ValueError("add_cross_attention_positions needs a UNet with config.sample_size")
    base = (int(size), int(size)) if not isinstance(size, (list, tuple)) \
        else (int(size[0]), int(size[1]))
    handle = CrossAttentionPositions(unet, base)
    if handle.num_attentions == 0:
        handle.remove()
        raise ValueError("add_cross_attention_positions: the UNet has no cross-attention "
                         "(no Transformer2DModel with attn2); nothing to attach to")
    return handle
