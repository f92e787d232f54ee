"""BLIP-2 Q-Former resampler: MM-Interleaved's official (post-norm) resampler.

Shape key: b batch · n queries · s context tokens · h heads · dh head width · d width.

Learned queries pass through transformers' ``Blip2QFormerModel`` (BERT-style post-norm
layers; in layers ``0, k, 2k, …`` for ``cross_every = k`` also cross-attention to the
context), then an optional Linear::

    x = LayerNorm(queries)
    for each layer:
        x = LN(x + Dense(SelfAttn(x)))
        x = LN(x + Dense(CrossAttn(x, context)))        if layer % k == 0
        x = LN(x + Dense(GELU(Dense(x))))               (the query FFN)
    out = proj(x)                                       (no final norm)

With ``qk_norm`` every head's q and k (self- and cross-attention) go through a
LayerNorm over dh (eps ``layer_norm_eps``) before the dot product, as in the official
model. transformers' Q-Former has no such option; it is added by composition: each
attention module gets ``q_norm`` / ``k_norm`` children and forward hooks on its
``query`` and ``key`` Linears that normalise their outputs head by head. transformers'
code is neither copied nor patched, and the state-dict keys are the official ones
(``queries``, ``blip2qformer.encoder.layer.{i}.attention.attention.q_norm.weight``, …).

MM-Interleaved uses it twice: in the visual tokenizer (64 queries, 768 wide, 12 layers,
12 heads, cross-attention every 2nd layer to the 1024-d ViT, qk-norm, then 768 → LLM
width) and in the image decoder's context encoder (77 queries, 1024 wide, 1 layer,
16 heads, no qk-norm, no dropout, no projection). The pre-norm
[`PerceiverResampler`][mmlayers.layers.resampler.PerceiverResampler] stays the library's
default.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mmlayers._optional import require

__all__ = ["QFormerResampler"]


class _HeadNormHook:
    """Forward hook on a q/k Linear: LayerNorm over dh of each head of its output."""

    def __init__(self, norm: nn.LayerNorm, heads: int) -> None:
        self.norm, self.heads = norm, heads

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        x = rearrange(output, "... (h dh) -> ... h dh", h=self.heads)
        return rearrange(self.norm(x), "... h dh -> ... (h dh)")


class QFormerResampler(nn.Module):
    """Learned queries + transformers' BLIP-2 Q-Former (+ qk-norm) + optional Linear.

    See the module docstring for the formula. Needs ``transformers`` (imported when
    built).

    Args:
        dim: Q-Former width d.
        num_queries: n.
        depth: Q-Former layers.
        cross_every: cross-attention in layers ``i % cross_every == 0``.
        context_dim: width of the context (transformers' ``encoder_hidden_size``).
        num_heads: heads h.
        out_dim: width of a final Linear (``None``: no projection, output width d).
        out_init_std: init std of that Linear's weight (official: 1e-3), bias 0.
        qk_norm: per-head LayerNorm on q and k.
        mlp_dim: FFN width (transformers' ``intermediate_size``; official 3072 for both).
        layer_norm_eps: eps of every LayerNorm, qk-norms included (1e-12, BERT's).
        dropout: hidden dropout (official: 0.1 in the visual tokenizer, 0 in the context
            encoder).
        attention_dropout: attention-probability dropout (official: as ``dropout``).
        init_std: normal init std of the queries and Linears (0.02).
        attn_implementation: transformers attention backend (``"sdpa"`` or ``"eager"``).
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Shapes:
        context (b, s, context_dim); context_padding_mask (b, s) bool, True = padding;
        queries (b or 1, n, d) to replace the learned ones (optional) → (b, n, out_dim).

    Examples:
        >>> import torch
        >>> from mmlayers.layers.qformer import QFormerResampler
        >>> r = QFormerResampler(dim=32, num_queries=4, depth=2, context_dim=48, num_heads=4,
        ...                      out_dim=64, mlp_dim=64).eval()
        >>> ctx, pad = torch.randn(2, 10, 48), torch.zeros(2, 10, dtype=torch.bool)
        >>> pad[1, 6:] = True
        >>> r(ctx, context_padding_mask=pad).shape
        torch.Size([2, 4, 64])
        >>> for k in sorted(k for k in r.state_dict() if ".0.attention.attention" in k)[:4]:
        ...     print(k)
        blip2qformer.encoder.layer.0.attention.attention.k_norm.bias
        blip2qformer.encoder.layer.0.attention.attention.k_norm.weight
        blip2qformer.encoder.layer.0.attention.attention.key.bias
        blip2qformer.encoder.layer.0.attention.attention.key.weight
    """

    def __init__(self, *, dim: int = 768, num_queries: int = 64, depth: int = 12,
                 cross_every: int = 2, context_dim: int | None = None, num_heads: int = 12,
                 out_dim: int | None = None, out_init_std: float | None = None,
                 qk_norm: bool = True, mlp_dim: int = 3072, layer_norm_eps: float = 1e-12,
                 dropout: float = 0.1, attention_dropout: float = 0.1, init_std: float = 0.02,
                 attn_implementation: str = "sdpa", device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("num_queries", num_queries), ("depth", depth),
                        ("cross_every", cross_every), ("num_heads", num_heads),
                        ("mlp_dim", mlp_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if dim % num_heads != 0:
            raise ValueError(f"dim = {dim} must be divisible by num_heads = {num_heads}")
        for name, v in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        require("transformers", "hf")
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        self.dim, self.num_queries, self.num_heads = dim, num_queries, num_heads
        self.context_dim = context_dim or dim
        self.out_dim = out_dim or dim
        self.out_init_std, self.init_std, self.qk_norm = out_init_std, init_std, qk_norm
        config = Blip2QFormerConfig(
            hidden_size=dim, num_hidden_layers=depth, num_attention_heads=num_heads,
            intermediate_size=mlp_dim, cross_attention_frequency=cross_every,
            encoder_hidden_size=self.context_dim, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=attention_dropout, layer_norm_eps=layer_norm_eps,
            initializer_range=init_std)
        config._attn_implementation = attn_implementation
        self.blip2qformer = Blip2QFormerModel(config).to(device=device, dtype=dtype)
        self.queries = nn.Parameter(torch.empty(1, num_queries, dim, device=device, dtype=dtype))
        self.proj = (nn.Linear(dim, out_dim, device=device, dtype=dtype) if out_dim is not None
                     else nn.Identity())
        self._hooks = []
        if qk_norm:
            dh = dim // num_heads
            for name, module in list(self.blip2qformer.named_modules()):
                if not (name.endswith("attention.attention") or name.endswith(
                        "crossattention.attention")):
                    continue
                for which in ("q", "k"):
                    norm = nn.LayerNorm(dh, eps=layer_norm_eps, device=device, dtype=dtype)
                    module.add_module(f"{which}_norm", norm)
                    target = module.query if which == "q" else module.key
                    self._hooks.append(target.register_forward_hook(
                        _HeadNormHook(norm, num_heads)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Queries and Linears normal(init_std), biases 0, LayerNorms (1, 0); the output
        Linear normal(out_init_std) when given."""
        nn.init.normal_(self.queries, std=self.init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        if isinstance(self.proj, nn.Linear) and self.out_init_std is not None:
            nn.init.normal_(self.proj.weight, std=self.out_init_std)

    def forward(self, context: torch.Tensor, context_padding_mask: torch.Tensor | None = None,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """See the class docstring; returns (b, n, out_dim)."""
        if not isinstance(context, torch.Tensor) or context.dim() != 3 \
                or context.shape[-1] != self.context_dim:
            raise ValueError(f"context must have shape (b, s, {self.context_dim}), "
                             f"got {tuple(getattr(context, 'shape', ()))}")
        b, s, _ = context.shape
        keep = None
        if context_padding_mask is not None:
            m = context_padding_mask
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool \
                    or tuple(m.shape) != (b, s):
                raise ValueError(f"context_padding_mask must be a bool tensor of shape {(b, s)} "
                                 f"(True = padding), got {getattr(m, 'dtype', type(m))} "
                                 f"{tuple(getattr(m, 'shape', ()))}")
            keep = (~m).long()
        if queries is None:
            queries = self.queries.expand(b, -1, -1)
        elif queries.dim() != 3 or queries.shape[0] not in (1, b) or queries.shape[-1] != self.dim:
            raise ValueError(f"queries must have shape ({b} or 1, n, {self.dim}), "
                             f"got {tuple(queries.shape)}")
        out = self.blip2qformer(query_embeds=queries.expand(b, -1, -1),
                                encoder_hidden_states=context, encoder_attention_mask=keep)
        return self.proj(out.last_hidden_state)
