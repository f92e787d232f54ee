"""Feature synchronizers inside any Hugging Face decoder-only causal LM, through hooks.

Shape key: b batch · n text tokens · m images · s flattened tokens of one image's pyramid
(Σ_l size_l²) · d width.

MM-Interleaved puts a tanh-gated [`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer]
between self-attention and the MLP of every 4th decoder layer of a frozen LLM::

    h = h + attn(norm1(h))
    h = h + tanh(g) · sync(RMSNorm(h), RMSNorm(vision))      # g = 0 at init
    h = h + mlp(norm2(h))

[`attach_synchronizers`][mmlayers.adapters.llm.attach_synchronizers] adds this to a stock ``transformers`` model without copying
its modeling code, swapping its class or patching it. Placement ``"after_attention"`` uses
two forward hooks on public submodules of each chosen decoder layer: a pre-hook on the
module that first reads the post-attention residual stream ``h`` (``post_attention_layernorm``
in Llama) replaces its input by ``h + u`` with ``u = tanh(g)·sync(…)``, and a hook on the
module whose output is added back to the residual (``mlp``) adds ``u`` to that output. The
layer then returns ``h + (mlp(norm2(h + u)) + u)``: the paper's formula, up to the order of
one floating-point addition. Placement ``"after_layer"`` (any architecture, e.g. GPT-NeoX's
parallel residual) adds the gated synchronizer to the output of the whole decoder layer.

The adapter weights live in ``handle.adapter``, a separate ``nn.Module``; the base model's
state-dict keys never change, and ``handle.remove()`` takes every hook off again.

Image features reach the synchronizers only inside ``with handle.vision(features,
visibility):``; the context is a stack on the handle, popped in ``finally``. Outside any
context the synchronizers are skipped and the model is the base model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from mmlayers.adapters.llm_layers import HOOK_POINTS, SynchronizerBlock, find_decoder_layers
from mmlayers.layers.synchronizer import PreparedValues

__all__ = ["HOOK_POINTS", "SynchronizerBlock", "SynchronizerHandle", "attach_synchronizers",
           "find_decoder_layers"]

logger = logging.getLogger(__name__)


class _VisionContext:
    """The images of one ``with handle.vision(...)`` block and its per-call scratch."""

    def __init__(self, features, visibility, cache_values):
        self.features, self.visibility, self.cache_values = features, visibility, cache_values
        self.past = 0          # positions already in the KV cache for the current forward
        self.values = {}       # (layer key, query batch) → PreparedValues
        self.pending = {}      # layer key → gated output between the two hooks of a layer

    def batch_index(self, batch: int) -> torch.Tensor | None:
        b = self.features.shape[0]
        if batch == b:
            return None
        if batch % b:
            raise ValueError(f"the model got batch {batch}, which is not a multiple of the "
                             f"{b} rows of image features given to handle.vision()")
        return torch.arange(batch, device=self.features.device) // (batch // b)

    def rows(self, batch: int, n: int) -> torch.Tensor | None:
        """Visibility of the n query positions past … past + n − 1 → (batch, n, m)."""
        vis = self.visibility
        if vis is None:
            return None
        idx = self.batch_index(batch)
        if vis.dim() == 3:
            n_vis = vis.shape[1]
            if self.past == 0 and n < n_vis:
                raise ValueError(f"visibility covers {n_vis} tokens but the model got {n}")
            pos = (torch.arange(n, device=vis.device) + self.past).clamp(max=n_vis - 1)
            vis = vis[:, pos]   # positions past the prompt use its last row
        return vis if idx is None else vis.index_select(0, idx)


class SynchronizerHandle:
    """Synchronizers attached to a causal LM (made by [`attach_synchronizers`][mmlayers.adapters.llm.attach_synchronizers]).

    Attributes:
        model: the wrapped model (unchanged but for hooks).
        adapter: ``nn.Module`` holding every ``SynchronizerBlock`` (``adapter.blocks[str(i)]``
            for decoder layer i); save, load and train this.
        layer_indices: decoder layers that carry a synchronizer.
        placement: ``"after_attention"`` or ``"after_layer"``.
        hook_points: the (input, output) submodule names used by ``"after_attention"``.
        config: the keyword arguments the blocks were built with (JSON-able).
    """

    def __init__(self, model, layers, indices, placement, hook_points, adapter, config):
        self.model, self.adapter, self.config = model, adapter, config
        self.layer_indices, self.placement, self.hook_points = tuple(indices), placement, hook_points
        self._stack: list[_VisionContext] = []
        self._hooks = [model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True)]
        for i in indices:
            key, layer = str(i), layers[i]
            if placement == "after_attention":
                src, dst = (layer.get_submodule(name) for name in hook_points)
                self._hooks += [src.register_forward_pre_hook(self._make_in_hook(key)),
                                dst.register_forward_hook(self._make_out_hook(key))]
            else:
                self._hooks.append(layer.register_forward_hook(self._make_layer_hook(key)))

    @property
    def blocks(self) -> nn.ModuleDict:
        return self.adapter.blocks

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Take every hook off; the model is the base model again (idempotent)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @contextlib.contextmanager
    def vision(self, features: torch.Tensor, visibility: torch.Tensor | None = None, *,
               cache_values: bool = True,
               prepared: Mapping[str, PreparedValues] | None = None) -> Iterator[None]:
        """Make images visible to the synchronizers for the calls inside the block.

        Args:
            features: (b, m, s, dv) multi-scale features of the images of each row.
            visibility: (b, n, m) or (b, m) bool (e.g. from
                [`image_visibility`][mmlayers.layers.visibility.image_visibility]); ``None``: all
                visible. With (b, n, m), a forward that starts at cache position ``t``
                uses rows t, t+1, …; positions beyond row n − 1 (newly generated tokens) use
                the last row.
            cache_values: under ``torch.no_grad()``, compute each block's value projection
                and sampling layout ([`SynchronizerBlock.prepare_values`][mmlayers.adapters.llm_layers.SynchronizerBlock.prepare_values]) once and reuse
                it for every call in the block (decoding steps, beams). With grad enabled
                values are recomputed per call.
            prepared: values already prepared for ``features`` (block key → the block's
                [`SynchronizerBlock.prepare_values`][mmlayers.adapters.llm_layers.SynchronizerBlock.prepare_values] of the b rows), e.g. kept across
                the turns of a generation session; used instead of preparing them again
                (under ``torch.no_grad()`` with ``cache_values``).

        A batch of ``k·b`` rows (``generate`` with beams or several returned sequences
        repeats every row k times in place) reads image row ``i // k``. Nested blocks are
        allowed; the innermost wins. The context is removed on exit, also after exceptions.
        With gradient checkpointing, either call ``backward()`` inside the block or enable
        checkpointing with [`checkpoint_context_fn`][mmlayers.adapters.llm.SynchronizerHandle.checkpoint_context_fn] (the recomputation needs the
        images).
        """
        self._check_vision(features, visibility)
        ctx = _VisionContext(features, None if visibility is None else visibility.bool(),
                             cache_values)
        for key, values in (prepared or {}).items():
            if key not in self.blocks or not isinstance(values, PreparedValues) \
                    or (values.batch, values.images) != tuple(features.shape[:2]):
                raise ValueError(f"prepared[{key!r}] must be the PreparedValues of block "
                                 f"{sorted(self.blocks)} for the {tuple(features.shape[:2])} "
                                 f"(b, m) features")
            ctx.values[(key, features.shape[0])] = values
        self._stack.append(ctx)
        try:
            yield
        finally:
            self._stack.remove(ctx)

    def checkpoint_context_fn(self):
        """``context_fn`` for non-reentrant ``torch.utils.checkpoint`` of the decoder layers.

        Checkpointed layers are recomputed during ``backward()``, usually after the
        ``with handle.vision(...)`` block has closed; the recomputation then would not see
        the images (and checkpointing fails: different tensors saved). This returns the pair
        (forward context, recompute context) that re-opens, during recomputation, the image
        contexts active at the original forward. Use it as::

            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False, "context_fn": handle.checkpoint_context_fn})
        """
        saved = list(self._stack)

        @contextlib.contextmanager
        def recompute():
            before = list(self._stack)
            self._stack[:] = saved
            try:
                yield
            finally:
                self._stack[:] = before

        return contextlib.nullcontext(), recompute()

    def _check_vision(self, features, visibility) -> None:
        sync = next(iter(self.blocks.values())).sync
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        s, dv = sync.tokens_per_image, sync.value_dim
        if features.dim() != 4 or features.shape[2:] != (s, dv):
            raise ValueError(f"features must have shape (b, m, s={s}, dv={dv}) for level_sizes "
                             f"{sync.level_sizes} and value_dim {dv}, got {tuple(features.shape)}")
        b, m = features.shape[:2]
        if m >= sync.max_images:
            raise ValueError(f"got m={m} images per row but max_images={sync.max_images} "
                             f"allows at most {sync.max_images - 1}")
        if visibility is None:
            return
        if not isinstance(visibility, torch.Tensor):
            raise TypeError(f"visibility must be a torch.Tensor, got {type(visibility).__name__}")
        if visibility.dim() not in (2, 3) or visibility.shape[0] != b or visibility.shape[-1] != m \
                or (visibility.dim() == 3 and visibility.shape[1] < 1):
            raise ValueError(f"visibility must have shape (b={b}, m={m}) or (b={b}, n, m={m}), "
                             f"got {tuple(visibility.shape)}")

    # ----------------------------------------------------------------------------- hooks
    def _model_pre_hook(self, module, args, kwargs):
        if self._stack:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            get = getattr(cache, "get_seq_length", None)
            self._stack[-1].past = int(get()) if callable(get) else 0
        return None

    def _gated(self, key: str, hidden: torch.Tensor) -> torch.Tensor | None:
        if not self._stack:
            return None
        ctx, block = self._stack[-1], self.blocks[key]
        batch, n = hidden.shape[:2]
        vis = ctx.rows(batch, n)
        reuse = ctx.cache_values and not torch.is_grad_enabled()
        values = ctx.values.get((key, batch)) if reuse else None
        if values is None:
            base = ctx.values.get((key, ctx.features.shape[0])) if reuse else None
            if base is None:
                base = block.prepare_values(ctx.features)
            idx = ctx.batch_index(batch)
            values = base if idx is None else base.index_select(idx)
            if reuse:
                ctx.values[(key, ctx.features.shape[0])] = base
                ctx.values[(key, batch)] = values
        return block(hidden, values, vis)

    def _make_in_hook(self, key):
        def hook(module, args):
            gated = self._gated(key, args[0])
            if gated is None:
                return None
            self._stack[-1].pending[key] = gated
            return (args[0] + gated, *args[1:])
        return hook

    def _make_out_hook(self, key):
        def hook(module, args, output):
            gated = self._stack[-1].pending.pop(key, None) if self._stack else None
            if gated is None:
                return None
            if isinstance(output, tuple):
                return (output[0] + gated, *output[1:])
            return output + gated
        return hook

    def _make_layer_hook(self, key):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            gated = self._gated(key, hidden)
            if gated is None:
                return None
            if isinstance(output, tuple):
                return (hidden + gated, *output[1:])
            return hidden + gated
        return hook


def attach_synchronizers(model: nn.Module, *, every: int = 4, layers: Sequence[int] | None = None,
                         value_dim: int = 1024, dim: int | None = None, heads: int = 16,
                         points: int = 8, level_sizes: Sequence[int] = (32, 16, 8),
                         base_size: int = 16, offset_init: float = 3.0, max_images: int = 50,
                         placement: str = "auto", hook_points: tuple[str, str] | None = None,
                         layers_path: str | None = None, eps: float | None = None,
                         backend: str | None = None, device=None, dtype=None
                         ) -> SynchronizerHandle:
    """Attach gated feature synchronizers to the decoder layers of a causal LM.

    Args:
        model: a Hugging Face decoder-only ``*ForCausalLM`` (or any module whose decoder
            layers ``find_decoder_layers`` finds, or ``layers_path`` names).
        every: synchronizers in layers with ``index % every == 0`` (10 of Vicuna-13B's 40).
        layers: explicit layer indices instead of ``every``.
        value_dim: dv, width of the image features (paper: 1024).
        dim: synchronizer width (paper: 1024).
        heads: synchronizer heads (paper: 16).
        points: sampling points per head, level and image (paper: 8).
        level_sizes: side of each pyramid level read (paper: (32, 16, 8)).
        base_size: offset scale base (paper: 16).
        offset_init: sampling-offset bias range (paper: 3.0).
        max_images: rows of the relative-image-position table (paper: 50).
        placement: ``"after_attention"`` (exact paper formula; needs ``hook_points`` or a
            ``model_type`` in [`HOOK_POINTS`][mmlayers.adapters.llm_layers.HOOK_POINTS]), ``"after_layer"`` (any layer: the
            synchronizer is added to the layer's output), or ``"auto"`` (the first if the
            hook points are known, else the second).
        hook_points: (input module, output module) names inside a decoder layer for
            ``"after_attention"``: the first module that reads the residual stream right after
            attention, and the module whose output is added back to it.
        eps: RMSNorm epsilon; default the model's ``rms_norm_eps`` / ``layer_norm_epsilon``.
        device: of the adapter; default that of the model's first parameter.
        dtype: of the adapter; default that of the model's first parameter.
        layers_path: dotted path of the decoder layer list inside ``model``; default: the one
            [`find_decoder_layers`][mmlayers.adapters.llm_layers.find_decoder_layers] finds.
        backend: deformable-attention backend of every synchronizer (``None``: ``"auto"``).

    Returns:
        a [`SynchronizerHandle`][mmlayers.adapters.llm.SynchronizerHandle]; ``handle.remove()`` detaches.

    Examples:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> llm = LlamaForCausalLM(cfg).eval()
        >>> handle = attach_synchronizers(llm, every=2, value_dim=8, heads=2, points=2,
        ...                               level_sizes=(4, 2), base_size=2)
        >>> handle.layer_indices, handle.placement
        ((0,), 'after_attention')
        >>> ids = torch.tensor([[1, 5, 7]])
        >>> with torch.no_grad(), handle.vision(torch.randn(1, 2, 20, 8)):
        ...     logits = llm(ids).logits
        >>> handle.remove()
        >>> torch.equal(logits, llm(ids).logits)   # gates start at zero
        True
    """
    decoder_layers = find_decoder_layers(model, layers_path)
    total = len(decoder_layers)
    if layers is None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        indices = list(range(0, total, every))
    else:
        indices = sorted(set(layers))
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < total]
        if bad or not indices:
            raise ValueError(f"layers must be indices in [0, {total}), got {list(layers)!r}")
    if placement not in ("auto", "after_attention", "after_layer"):
        raise ValueError(f"placement must be 'auto', 'after_attention' or 'after_layer', "
                         f"got {placement!r}")
    config = getattr(model, "config", None)
    text_cfg = config.get_text_config() if config is not None else None
    model_type = getattr(text_cfg, "model_type", None)
    if hook_points is None:
        hook_points = HOOK_POINTS.get(model_type)
    if placement == "auto":
        placement = "after_attention" if hook_points is not None else "after_layer"
        if hook_points is None:
            logger.info("no known after-attention hook points for model_type %r; using "
                        "placement='after_layer'", model_type)
    if placement == "after_attention":
        if hook_points is None:
            raise ValueError(f"placement='after_attention' needs hook_points=(input module, "
                             f"output module) for model_type {model_type!r}; known types: "
                             f"{sorted(HOOK_POINTS)}")
        for name in hook_points:
            try:
                decoder_layers[indices[0]].get_submodule(name)
            except AttributeError:
                raise ValueError(f"decoder layer {type(decoder_layers[indices[0]]).__name__} "
                                 f"has no submodule {name!r} (hook_points={hook_points})") from None
    hidden = getattr(text_cfg, "hidden_size", None)
    if hidden is None:
        raise ValueError(f"cannot read hidden_size from the config of {type(model).__name__}")
    if eps is None:
        eps = getattr(text_cfg, "rms_norm_eps", None) or getattr(text_cfg, "layer_norm_epsilon",
                                                                 None) or 1e-6
    ref = next(model.parameters())
    kw = {"device": ref.device if device is None else device,
          "dtype": ref.dtype if dtype is None else dtype}
    block_cfg = {"hidden_size": hidden, "value_dim": value_dim, "dim": dim, "heads": heads,
                 "points": points, "level_sizes": list(level_sizes), "base_size": base_size,
                 "offset_init": offset_init, "max_images": max_images, "eps": float(eps)}
    adapter = nn.Module()
    adapter.blocks = nn.ModuleDict({str(i): SynchronizerBlock(**block_cfg, backend=backend, **kw)
                                    for i in indices})
    cfg = {**block_cfg, "layers": indices, "placement": placement,
           "hook_points": list(hook_points) if placement == "after_attention" else None}
    return SynchronizerHandle(model, decoder_layers, indices, placement,
                              tuple(hook_points) if placement == "after_attention" else None,
                              adapter, cfg)
