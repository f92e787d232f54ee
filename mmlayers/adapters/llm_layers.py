"""What the feature synchronizers put into a Hugging Face decoder layer, and where.

Shape key: b batch · n text tokens · m images · s flattened tokens of one image's pyramid
(Σ_l size_l²) · d width.

[`SynchronizerBlock`][mmlayers.adapters.llm_layers.SynchronizerBlock] is the gated MMFS of one LLM layer; [`HOOK_POINTS`][mmlayers.adapters.llm_layers.HOOK_POINTS] names
the submodules of each architecture it is hooked between; [`find_decoder_layers`][mmlayers.adapters.llm_layers.find_decoder_layers] finds
the layers. [`attach_synchronizers`][mmlayers.adapters.llm.attach_synchronizers] puts them together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmlayers.layers.synchronizer import FeatureSynchronizer, PreparedValues

__all__ = ["HOOK_POINTS", "SynchronizerBlock", "find_decoder_layers"]


#: model_type → (module that first reads the post-attention residual stream, module whose
#: output is added back to it). Every entry is checked against the hand-written layer formula
#: in tests/adapters/test_llm_placement.py.
HOOK_POINTS: dict[str, tuple[str, str]] = {
    "llama": ("post_attention_layernorm", "mlp"),
    "mistral": ("post_attention_layernorm", "mlp"),
    "qwen2": ("post_attention_layernorm", "mlp"),
    "qwen3": ("post_attention_layernorm", "mlp"),
    "gemma": ("post_attention_layernorm", "mlp"),
    "phi3": ("post_attention_layernorm", "mlp"),
    "gemma2": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("mlp", "post_feedforward_layernorm"),
    "gpt2": ("ln_2", "mlp"),
}

_LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                "transformer.layers", "transformer.blocks")


def find_decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers of a causal LM.

    Args:
        model: e.g. a ``LlamaForCausalLM``.
        layers_path: dotted attribute path (``"model.layers"``); default: the known paths,
            then the longest ``ModuleList`` with ``config.num_hidden_layers`` entries.

    Raises:
        ValueError: no such list.
    """
    paths = (layers_path,) if layers_path is not None else _LAYER_LISTS
    for path in paths:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj):
            return obj
    if layers_path is not None:
        raise ValueError(f"layers_path={layers_path!r} is not a non-empty nn.ModuleList of "
                         f"{type(model).__name__}")
    config = getattr(model, "config", None)
    want = getattr(config.get_text_config(), "num_hidden_layers", None) if config else None
    lists = [mod for mod in model.modules() if isinstance(mod, nn.ModuleList)
             and len(mod) and (want is None or len(mod) == want)]
    if not lists:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; pass "
                         "layers_path= (e.g. 'model.layers')")
    return max(lists, key=len)


class SynchronizerBlock(nn.Module):
    """``tanh(gate) · sync(RMSNorm(h), RMSNorm(vision))``: the gated MMFS of one LLM layer.

    Args:
        hidden_size: LLM width (the synchronizer's query and output width).
        value_dim: image feature width dv.
        dim: synchronizer width (default ``value_dim``, as in the paper:
            ``ratio = value_dim / hidden_size``).
        heads: ``heads`` of the [`FeatureSynchronizer`][mmlayers.layers.synchronizer.FeatureSynchronizer].
        points: its ``points``.
        level_sizes: its ``level_sizes``.
        base_size: its ``base_size``.
        offset_init: its ``offset_init``.
        max_images: its ``max_images``.
        eps: RMSNorm epsilon.
        backend: its deformable-attention ``backend``.
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Examples:
        >>> import torch
        >>> blk = SynchronizerBlock(hidden_size=16, value_dim=8, heads=2, points=2,
        ...                         level_sizes=(4, 2), base_size=2)
        >>> h, feats = torch.randn(1, 3, 16), torch.randn(1, 2, 20, 8)   # (b,n,d) (b,m,s,dv)
        >>> blk(h, blk.project_values(feats)).abs().max().item()         # gate 0: identity
        0.0
    """

    def __init__(self, *, hidden_size: int, value_dim: int, dim: int | None = None,
                 heads: int = 16, points: int = 8, level_sizes: Sequence[int] = (32, 16, 8),
                 base_size: int = 16, offset_init: float = 3.0, max_images: int = 50,
                 eps: float = 1e-6, backend: str | None = None, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.query_norm = nn.RMSNorm(hidden_size, eps=eps, **kw)
        self.vision_norm = nn.RMSNorm(value_dim, eps=eps, **kw)
        self.sync = FeatureSynchronizer(
            dim=value_dim if dim is None else dim, query_dim=hidden_size, value_dim=value_dim,
            out_dim=hidden_size, heads=heads, points=points, level_sizes=level_sizes,
            base_size=base_size, offset_init=offset_init, max_images=max_images,
            backend=backend, **kw)
        self.gate = nn.Parameter(torch.zeros(1, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Norm weights 1, the synchronizer's own init, gate 0 (the block is the identity)."""
        self.query_norm.reset_parameters()
        self.vision_norm.reset_parameters()
        self.sync.reset_parameters()
        nn.init.zeros_(self.gate)

    def project_values(self, features: torch.Tensor) -> torch.Tensor:
        """(b, m, s, dv) image features → (b, m, s, dim) synchronizer values."""
        p = self.gate
        return self.sync.project_values(self.vision_norm(features.to(p.device, p.dtype)))

    def prepare_values(self, features: torch.Tensor) -> PreparedValues:
        """(b, m, s, dv) image features → values projected and laid out for sampling, to
        reuse across calls (see [`FeatureSynchronizer.prepare_values`][mmlayers.layers.synchronizer.FeatureSynchronizer.prepare_values])."""
        return self.sync.prepare_values(values=self.project_values(features))

    def forward(self, hidden: torch.Tensor, values: torch.Tensor | PreparedValues,
                visibility: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (b, n, d), values (b, m, s, dim) or prepared, visibility (b, n, m) | (b, m)
        → (b, n, d)."""
        q = self.query_norm(hidden.to(self.gate.dtype))
        out = self.sync(q, visibility=visibility, values=values)
        return (self.gate.tanh() * out).to(hidden.dtype)
