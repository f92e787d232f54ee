"""Feature synchronizers on the skip connections of a diffusers ``UNet2DConditionModel``.

Shape key: b batch · m images (1 here: the previous image) · l pyramid levels · s flattened
tokens of one image's pyramid (Σ_l size_l²) · h heads · p points · d width · c channels ·
H W feature-map height and width.

MM-Interleaved's image decoder lets every UNet pixel read the multi-scale pyramid of the
image that precedes the one being generated. One block per down-path skip tensor (the
``conv_in`` output and every resnet / downsampler output: 12 for SD-2.1) and one on the
mid-block output compute, for a feature map ``x`` (b, c, H, W)::

    q        = LayerNorm(x as (b, H·W, c)) + sincos_2d(H, W, c; frame = sample_size²)
    ref      = ((j + 0.5) / W, (i + 0.5) / H)                       # own pixel centre
    residual = Conv1x1(FeatureSynchronizer(q, LayerNorm(pyramid), ref))  # zero-init conv

The residual is ADDED to the skip tensor only (the tensor that flows on to the next down
block is unchanged) and to the mid-block output. Offsets are measured in cells of the
query map (``base_size`` = its side), as the official ``base_spatial_shape``.

How it enters the UNet (public hooks only, no copied forward, no patching):

- forward hooks on ``conv_in`` and on every down block compute the residual of each skip
  tensor as soon as it exists (a down block returns ``(hidden_states, res_samples)``; the
  hook returns nothing, so the tensor flowing on is untouched);
- a forward pre-hook on every up block adds the residuals to the ``res_hidden_states_tuple``
  keyword it receives — where, and only where, the skip tensors are consumed. This is what
  ``down_block_additional_residuals`` does (diffusers adds those after the down path), but
  that argument must be known before the forward, and these residuals depend on the skip
  tensors themselves;
- a forward hook on ``mid_block`` adds the mid residual to its output.

The previous image's pyramid is given through [`UNetSynchronizer.condition`][mmlayers.adapters.unet_sync.UNetSynchronizer.condition], a
re-entrant context manager (a ``contextvars`` stack, restored on exit and on exceptions).
Outside it the hooks do nothing and the UNet is the bare UNet.

Images without a previous image: the official block then sees no image, its attention
reads only the zero "ignore" value and the residual is ``Conv(output_proj(0))``, a learned
per-channel constant (zero at init). ``no_image="official"`` (default) keeps that;
``no_image="zero"`` gives exactly zero residual (and skips the work when no image of the
batch has one).

The block is [`SkipSynchronizer`][mmlayers.adapters.skip_sync.SkipSynchronizer] (its docstring states
the one difference from the official block: exact sincos positions instead of a bicubic
resize of the latent-size table).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from mmlayers.adapters.skip_sync import SkipSynchronizer
from mmlayers.adapters.unet_inputs import _check_conditional_unet

__all__ = ["UNetSynchronizer"]

# Stack of (synchronizer id, state) frames; a context variable, so threads and async tasks
# each see their own and ``condition`` blocks nest.
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("mmlayers_unet_sync",
                                                                 default=())


class _State:
    """One ``condition`` frame: the pyramid, its per-block values and per-forward scratch."""

    def __init__(self, pyramid: torch.Tensor | None, has_image: torch.Tensor | None,
                 any_image: bool) -> None:
        self.pyramid, self.has_image, self.any_image = pyramid, has_image, any_image
        self.values: dict[tuple[int, int], torch.Tensor] = {}
        self.pending: list[torch.Tensor | None] = []
        self.index = 0


class UNetSynchronizer(nn.Module):
    """Synchronizer blocks for every skip tensor and the mid block of a diffusers UNet.

    Build with [`for_unet`][mmlayers.adapters.unet_sync.UNetSynchronizer.for_unet] (sizes read from the UNet's modules and config), then
    [`attach`][mmlayers.adapters.unet_sync.UNetSynchronizer.attach] it; run the UNet inside [`condition`][mmlayers.adapters.unet_sync.UNetSynchronizer.condition] to give the previous image's
    pyramid. The blocks are ``down`` (one per skip tensor, ``conv_in`` first, in the order
    diffusers collects them) and ``mid``; each is a [`SkipSynchronizer`][mmlayers.adapters.skip_sync.SkipSynchronizer] or any module
    with the same ``forward(x, values, has_image)`` and ``project_values(pyramid)``.

    Args:
        skip_channels: c of every skip tensor (``conv_in`` first).
        skip_sizes: side of every skip tensor (``conv_in`` first).
        mid_channels: c of the mid-block output.
        mid_size: side of the mid-block output.
        value_dim: dv of the pyramid.
        sample_size: the UNet's (H0, W0) (frame of the position tables).
        dim: width of each block's [`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer] (paper: 1024).
        heads: its heads (paper: 16).
        points: its sampling points per head and level (paper: 8).
        level_sizes: side of each pyramid level read (paper: (64, 32, 16, 8)).
        offset_init: sampling-offset bias range (paper: 1.0).
        max_images: rows of the relative-image-position table (paper: 10).
        backend: deformable-attention backend.
        query_chunk: at most this many queries per deformable-attention call.
        no_image: ``"official"`` or ``"zero"`` (module docstring).
        pos_table: query position tables, ``"exact"`` or ``"official"``
            ([`SkipSynchronizer`][mmlayers.adapters.skip_sync.SkipSynchronizer]).
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Supported UNets: diffusers ``UNet2DConditionModel`` layouts whose up blocks consume
    exactly the skip tensors of the down path, with a mid block; a UNet built with
    ``mid_block_type=None`` is refused by [`skip_layout`][mmlayers.adapters.unet_sync.UNetSynchronizer.skip_layout].
    Extra UNet inputs (SDXL's ``added_cond_kwargs``, ``class_labels``) do not concern the
    synchronizer; [`diffusion_loss`][mmlayers.adapters.diffusion_objective.diffusion_loss] and
    [`ImageGenerator`][mmlayers.adapters.diffusion_sampling.ImageGenerator] pass them on.

    Examples:
        >>> import torch
        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel(
        ...     sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        ...     block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        ...     attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
        >>> sync = UNetSynchronizer.for_unet(unet, value_dim=6, dim=8, heads=2, points=2,
        ...                                  level_sizes=(4, 2)).attach(unet)
        >>> len(sync.down)  # conv_in, 2 resnets, 1 downsampler
        4
        >>> x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([10, 20]), torch.randn(2, 5, 8)
        >>> with torch.no_grad(), sync.condition(torch.randn(2, 20, 6)):
        ...     y = unet(x, t, encoder_hidden_states=ctx).sample
        >>> sync.remove()
        >>> with torch.no_grad():
        ...     torch.equal(y, unet(x, t, encoder_hidden_states=ctx).sample)  # zero convs
        True
    """

    def __init__(self, *, skip_channels: Sequence[int], skip_sizes: Sequence[int],
                 mid_channels: int, mid_size: int, value_dim: int,
                 sample_size: int | Sequence[int], dim: int = 1024, heads: int = 16,
                 points: int = 8, level_sizes: Sequence[int] = (64, 32, 16, 8),
                 offset_init: float = 1.0, max_images: int = 10, no_image: str = "official",
                 backend: str | None = None, query_chunk: int | None = None,
                 pos_table: str = "exact", device=None, dtype=None) -> None:
        super().__init__()
        if no_image not in ("official", "zero"):
            raise ValueError(f"no_image must be 'official' or 'zero', got {no_image!r}")
        skip_channels, skip_sizes = list(skip_channels), list(skip_sizes)
        if not skip_channels or len(skip_channels) != len(skip_sizes):
            raise ValueError(f"skip_channels {skip_channels} and skip_sizes {skip_sizes} must "
                             f"be non-empty and of equal length")
        grid = ((sample_size, sample_size) if isinstance(sample_size, int)
                else tuple(int(v) for v in sample_size))
        kw = dict(value_dim=value_dim, grid_size=grid, dim=dim, heads=heads, points=points,
                  level_sizes=tuple(level_sizes), offset_init=offset_init,
                  max_images=max_images, backend=backend, query_chunk=query_chunk,
                  pos_table=pos_table, device=device, dtype=dtype)
        self.value_dim, self.level_sizes, self.no_image = value_dim, tuple(level_sizes), no_image
        self.down = nn.ModuleList(SkipSynchronizer(channels=c, size=s, **kw)
                                  for c, s in zip(skip_channels, skip_sizes, strict=True))
        self.mid = SkipSynchronizer(channels=mid_channels, size=mid_size, **kw)
        self._handles: list = []
        self._unet_ref: list[nn.Module] = []  # a list, so the UNet is not a submodule

    @property
    def tokens_per_image(self) -> int:
        """s = Σ_l size_l² of one pyramid."""
        return sum(v * v for v in self.level_sizes)

    @staticmethod
    def skip_layout(unet: nn.Module) -> tuple[list[int], list[int], int, int, tuple[int, int]]:
        """(skip channels, skip sides, mid channels, mid side, sample size) of a UNet.

        Raises:
            TypeError: ``unet`` lacks ``conv_in``, ``down_blocks``, ``mid_block``,
                ``up_blocks`` or a down block lacks ``resnets``; or it was built with
                ``mid_block_type=None`` (refused: the paper's layout puts a synchronizer
                on the mid-block output, and such a UNet has none).
        """
        if getattr(unet, "config", None) is not None and getattr(unet, "conv_in", None) \
                is not None and getattr(unet, "mid_block", None) is None:
            raise TypeError(
                f"this UNet has no mid block (mid_block_type="
                f"{getattr(unet.config, 'mid_block_type', None)!r}); UNetSynchronizer needs one "
                f"(one synchronizer reads the mid-block output): build the UNet with a mid "
                f"block, e.g. mid_block_type='UNetMidBlock2DCrossAttn'")
        for name in ("conv_in", "down_blocks", "up_blocks", "mid_block", "config"):
            if getattr(unet, name, None) is None:
                raise TypeError(f"expected a diffusers UNet2DConditionModel with a "
                                f"{name!r} attribute; {type(unet).__name__} has none")
        _check_conditional_unet(unet, "UNetSynchronizer")
        size = unet.config.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
        side = hw[0]
        channels, sides = [unet.conv_in.out_channels], [side]
        for i, block in enumerate(unet.down_blocks):
            if not hasattr(block, "resnets"):
                raise TypeError(f"down_blocks[{i}] ({type(block).__name__}) has no "
                                f"'resnets'; not a diffusers down block")
            for r in block.resnets:
                channels.append(r.out_channels)
                sides.append(side)
            for d in getattr(block, "downsamplers", None) or ():
                side = -(-side // 2)
                channels.append(d.out_channels)
                sides.append(side)
        mid_res = getattr(unet.mid_block, "resnets", None)
        mid_channels = mid_res[-1].out_channels if mid_res else channels[-1]
        ups = sum(len(getattr(b, "resnets", ())) for b in unet.up_blocks)
        if ups != len(channels):
            raise TypeError(f"up blocks consume {ups} skip tensors but the down path makes "
                            f"{len(channels)}; unsupported UNet layout")
        return channels, sides, mid_channels, side, hw

    @classmethod
    def for_unet(cls, unet: nn.Module, *, value_dim: int, **kwargs) -> UNetSynchronizer:
        """Blocks sized for ``unet`` (see [`skip_layout`][mmlayers.adapters.unet_sync.UNetSynchronizer.skip_layout]); ``kwargs`` as the class.

        Parameters are created on the device of the UNet unless ``device`` is given.
        """
        channels, sides, mid_c, mid_s, hw = cls.skip_layout(unet)
        kwargs.setdefault("device", unet.conv_in.weight.device)
        return cls(skip_channels=channels, skip_sizes=sides, mid_channels=mid_c,
                   mid_size=mid_s, value_dim=value_dim, sample_size=hw, **kwargs)

    # ----------------------------------------------------------------- attach / remove
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, unet: nn.Module) -> UNetSynchronizer:
        """Register the hooks on ``unet`` (module docstring); returns ``self``.

        Raises:
            RuntimeError: already attached.
            ValueError: the UNet's skip layout does not match the blocks.
        """
        if self._handles:
            raise RuntimeError("this UNetSynchronizer is already attached; call remove() first")
        channels, _, mid_c, _, _ = self.skip_layout(unet)
        mine = [blk.channels for blk in self.down]
        if channels != mine or mid_c != self.mid.channels:
            raise ValueError(f"UNet skip channels {channels} (mid {mid_c}) do not match the "
                             f"synchronizer's {mine} (mid {self.mid.channels}); build it with "
                             f"UNetSynchronizer.for_unet(unet, ...)")
        h = self._handles
        h.append(unet.register_forward_pre_hook(self._on_unet))
        h.append(unet.conv_in.register_forward_hook(self._on_conv_in))
        for block in unet.down_blocks:
            h.append(block.register_forward_hook(self._on_down))
        h.append(unet.mid_block.register_forward_hook(self._on_mid))
        for block in unet.up_blocks:
            h.append(block.register_forward_pre_hook(self._on_up, with_kwargs=True))
        self._unet_ref[:] = [unet]
        return self

    def remove(self) -> None:
        """Remove every hook; the UNet is the bare UNet again (its parameters and state-dict
        keys were never changed)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._unet_ref.clear()

    # ----------------------------------------------------------------- conditioning
    @contextlib.contextmanager
    def condition(self, pyramid: torch.Tensor | None,
                  has_image: torch.Tensor | None = None) -> Iterator[None]:
        """Run the attached UNet with this pyramid inside the ``with`` block.

        Args:
            pyramid: (b, s, dv) or (b, 1, s, dv): the previous image's levels flattened
                row-major and concatenated in ``level_sizes`` order (``unet_features`` of
                [`VisualTokenizerOutput`][mmlayers.vision.VisualTokenizerOutput]); ``None``: no image has
                one. The UNet batch may be r·b: sample i uses pyramid ``i mod b``
                (classifier-free guidance's ``cat([uncond, cond])``).
            has_image: (b,) bool, which images have a previous image; default all.

        Note:
            One device→host copy on entry (whether any image has a previous image).
        """
        if pyramid is not None:
            if not isinstance(pyramid, torch.Tensor):
                raise TypeError(f"pyramid must be a torch.Tensor or None, got "
                                f"{type(pyramid).__name__}")
            if pyramid.dim() == 3:
                pyramid = pyramid[:, None]
            s = self.tokens_per_image
            if pyramid.dim() != 4 or pyramid.shape[1] != 1 or pyramid.shape[2:] != (s, self.value_dim):
                raise ValueError(
                    f"pyramid must have shape (b, s={s}, dv={self.value_dim}) or (b, 1, s, dv) "
                    f"for level_sizes {self.level_sizes}, got {tuple(pyramid.shape)}")
            b = pyramid.shape[0]
            if has_image is None:
                has_image = torch.ones(b, dtype=torch.bool, device=pyramid.device)
            elif not isinstance(has_image, torch.Tensor) or tuple(has_image.shape) != (b,):
                raise ValueError(f"has_image must be a (b,)=({b},) tensor, got "
                                 f"{getattr(has_image, 'shape', has_image)!r}")
            has_image = has_image.to(device=pyramid.device, dtype=torch.bool)
            any_image = bool(has_image.any())
        else:
            any_image = False
        state = _State(pyramid, has_image, any_image)
        token = _ACTIVE.set(_ACTIVE.get() + ((id(self), state),))
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def _state(self) -> _State | None:
        for key, state in reversed(_ACTIVE.get()):
            if key == id(self):
                return state
        return None

    def _residual(self, state: _State, k: int, block: nn.Module,
                  x: torch.Tensor) -> torch.Tensor | None:
        if not state.any_image:
            if self.no_image == "zero":
                return None
            return block(x, None, None)
        b, bp = x.shape[0], state.pyramid.shape[0]
        if b % bp:
            raise ValueError(f"UNet batch {b} is not a multiple of the pyramid batch {bp}")
        r = b // bp
        if (k, r) not in state.values:
            v = block.project_values(state.pyramid.to(block.conv.weight.dtype))
            state.values[(k, r)] = v.repeat(r, 1, 1, 1) if r > 1 else v
        has = state.has_image.repeat(r) if r > 1 else state.has_image
        res = block(x, state.values[(k, r)], has)
        if self.no_image == "zero":
            res = res * has[:, None, None, None].to(res.dtype)
        return res

    # ----------------------------------------------------------------- hooks
    def _on_unet(self, module, args) -> None:
        state = self._state()
        if state is not None:
            state.pending.clear()
            state.index = 0
            if torch.is_grad_enabled():  # values carry a graph: never reuse across forwards
                state.values.clear()

    def _push(self, state: _State, x: torch.Tensor) -> None:
        k = state.index
        if k >= len(self.down):
            raise ValueError(f"the UNet produced more than the {len(self.down)} skip tensors "
                             f"this synchronizer was built for")
        state.pending.append(self._residual(state, k, self.down[k], x))
        state.index = k + 1

    def _on_conv_in(self, module, args, output) -> None:
        state = self._state()
        if state is not None:
            self._push(state, output)

    def _on_down(self, module, args, output) -> None:
        state = self._state()
        if state is not None:
            for skip in output[1]:
                self._push(state, skip)

    def _on_mid(self, module, args, output):
        state = self._state()
        if state is None:
            return None
        res = self._residual(state, len(self.down), self.mid, output)
        return output if res is None else output + res

    def _on_up(self, module, args, kwargs):
        state = self._state()
        if state is None:
            return None
        skips = kwargs.get("res_hidden_states_tuple")
        if skips is None:
            raise TypeError(f"{type(module).__name__} was called without the keyword "
                            f"'res_hidden_states_tuple'; unsupported UNet forward")
        n = len(skips)
        if n > len(state.pending):
            raise ValueError(f"up block consumes {n} skip tensors but only "
                             f"{len(state.pending)} residuals are pending")
        res = state.pending[len(state.pending) - n:]
        del state.pending[len(state.pending) - n:]
        kwargs = dict(kwargs)
        kwargs["res_hidden_states_tuple"] = tuple(
            s if r is None else s + r for s, r in zip(skips, res, strict=True))
        return args, kwargs
