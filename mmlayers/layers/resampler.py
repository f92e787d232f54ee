"""Perceiver resampler: a fixed number of learned queries summarise a variable context.

Shape key: b batch · n queries · s context tokens · h heads · dh head width · d width.

Each of ``depth`` pre-norm layers runs self-attention among the queries, then (in
layers ``0, k, 2k, …`` for ``cross_every = k``, as in the BLIP-2 Q-Former that
MM-Interleaved uses) cross-attention from the queries to the context, then an MLP::

    x = x + SelfAttn(norm(x))
    x = x + CrossAttn(norm(x), norm_ctx(context))       if layer % k == 0
    x = x + MLP(norm(x))
    out = proj(norm(x))

With ``qk_norm`` every head's q and k go through a LayerNorm over dh before the dot
product. All attention goes through ``torch.nn.functional.scaled_dot_product_attention``.

MM-Interleaved's resampler is a BERT-style post-norm Q-Former; this module is the
pre-norm equivalent (the usual choice for new code; it trains stably from scratch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["PerceiverResampler"]


class _Attention(nn.Module):
    """Multi-head attention (b, n, d) × (b, s, d_ctx) → (b, n, d) through SDPA."""

    def __init__(self, dim: int, *, context_dim: int, num_heads: int, qk_norm: bool,
                 qkv_bias: bool, norm_layer: type[nn.Module], device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        dh = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **kw)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias, **kw)
        self.q_norm = norm_layer(dh, **kw) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(dh, **kw) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h dh) -> b h n dh", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b s (two h dh) -> two b h s dh", two=2, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.proj(rearrange(out, "b h n dh -> b n (h dh)"))


class _Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module], device=None, dtype=None):
        kw = {"device": device, "dtype": dtype}
        super().__init__(nn.Linear(dim, hidden, **kw), act_layer(), nn.Linear(hidden, dim, **kw))


class _Layer(nn.Module):
    def __init__(self, dim: int, *, context_dim: int, num_heads: int, cross: bool, qk_norm: bool,
                 qkv_bias: bool, mlp_ratio: float, norm_layer: type[nn.Module],
                 act_layer: type[nn.Module], device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        akw = {"num_heads": num_heads, "qk_norm": qk_norm, "qkv_bias": qkv_bias,
               "norm_layer": norm_layer, **kw}
        self.norm1 = norm_layer(dim, **kw)
        self.self_attn = _Attention(dim, context_dim=dim, **akw)
        self.cross_attn = None
        if cross:
            self.norm_cross = norm_layer(dim, **kw)
            self.norm_context = norm_layer(context_dim, **kw)
            self.cross_attn = _Attention(dim, context_dim=context_dim, **akw)
        self.norm2 = norm_layer(dim, **kw)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), act_layer, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor, keep: torch.Tensor | None,
                has_context: torch.Tensor | None) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y, y)
        if self.cross_attn is not None:
            update = self.cross_attn(self.norm_cross(x), self.norm_context(context), keep)
            x = x + (update if has_context is None else update * has_context)
        return x + self.mlp(self.norm2(x))


class PerceiverResampler(nn.Module):
    """``num_queries`` learned queries read a context of any length (see the module docstring).

    Args:
        dim: query / hidden width d.
        num_queries: number of learned queries n.
        depth: number of layers.
        cross_every: cross-attention in layers ``0, k, 2k, …``; 1 = every layer.
        context_dim: width of the context (default ``dim``).
        num_heads: heads h; ``dim`` must be divisible by it.
        out_dim: width of the final Linear (default: no projection, output width ``dim``).
        out_init_std: init std of that Linear's weight (MM-Interleaved: 1e-3 for the
            768 → LLM-width projection); ``None`` keeps the trunc-normal(0.02) init.
        qk_norm: LayerNorm (``norm_layer``) over dh on every head's q and k.
        qkv_bias: bias in the q, k, v projections.
        mlp_ratio: MLP hidden width / dim.
        norm_layer: normalisation class.
        act_layer: activation class of the MLP.
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Shapes:
        context (b, s, context_dim); context_padding_mask (b, s) bool, True = padding;
        queries (b, n, d) to replace the learned ones (optional) → (b, n, out_dim).
        A row whose context is all padding gets no cross-attention update (its
        cross-attention output is zero) rather than NaNs.

    Examples:
        >>> import torch
        >>> from mmlayers.layers.resampler import PerceiverResampler
        >>> r = PerceiverResampler(dim=32, num_queries=4, depth=2, context_dim=48,
        ...                        num_heads=4, out_dim=64)
        >>> ctx, pad = torch.randn(2, 10, 48), torch.zeros(2, 10, dtype=torch.bool)
        >>> pad[1, 6:] = True
        >>> r(ctx, context_padding_mask=pad).shape
        torch.Size([2, 4, 64])
    """

    def __init__(self, *, dim: int = 768, num_queries: int = 64, depth: int = 12,
                 cross_every: int = 2, context_dim: int | None = None, num_heads: int = 12,
                 out_dim: int | None = None, out_init_std: float | None = None,
                 qk_norm: bool = True, qkv_bias: bool = True, mlp_ratio: float = 4.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, act_layer: type[nn.Module] = nn.GELU,
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("num_queries", num_queries), ("depth", depth),
                        ("cross_every", cross_every), ("num_heads", num_heads)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if dim % num_heads != 0:
            raise ValueError(f"dim = {dim} must be divisible by num_heads = {num_heads}")
        kw = {"device": device, "dtype": dtype}
        self.dim, self.num_queries, self.num_heads = dim, num_queries, num_heads
        self.context_dim = context_dim or dim
        self.out_dim = out_dim or dim
        self.out_init_std = out_init_std
        self.queries = nn.Parameter(torch.empty(num_queries, dim, **kw))
        self.layers = nn.ModuleList(
            _Layer(dim, context_dim=self.context_dim, num_heads=num_heads,
                   cross=i % cross_every == 0, qk_norm=qk_norm, qkv_bias=qkv_bias,
                   mlp_ratio=mlp_ratio, norm_layer=norm_layer, act_layer=act_layer, **kw)
            for i in range(depth)
        )
        self.norm = norm_layer(dim, **kw)
        self.proj = nn.Linear(dim, out_dim, **kw) if out_dim is not None else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Queries and Linears trunc-normal(0.02), biases 0, norms (1, 0); the output
        Linear normal(out_init_std) when given."""
        nn.init.trunc_normal_(self.queries, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        if isinstance(self.proj, nn.Linear) and self.out_init_std is not None:
            nn.init.normal_(self.proj.weight, std=self.out_init_std)

    def forward(self, context: torch.Tensor, context_padding_mask: torch.Tensor | None = None,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """See the class docstring; returns (b, n, out_dim)."""
        if context.dim() != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"context must have shape (b, s, {self.context_dim}), "
                             f"got {tuple(context.shape)}")
        b, s, _ = context.shape
        keep = has_context = None
        if context_padding_mask is not None:
            m = context_padding_mask
            if m.dtype != torch.bool or tuple(m.shape) != (b, s):
                raise ValueError(f"context_padding_mask must be a bool tensor of shape {(b, s)} "
                                 f"(True = padding), got {m.dtype} {tuple(m.shape)}")
            # Padded values are zeroed (so NaN/inf there cannot leak through 0-weights); an
            # all-padding row would make SDPA return NaN, so it attends to everything and
            # its cross-attention update is then multiplied by 0.
            context = context.masked_fill(rearrange(m, "b s -> b s 1"), 0.0)
            empty = m.all(dim=1, keepdim=True)
            keep = rearrange(~m | empty, "b s -> b 1 1 s")
            has_context = rearrange(~empty, "b 1 -> b 1 1").to(context.dtype)
        if queries is None:
            x = self.queries.expand(b, -1, -1)
        else:
            if queries.dim() != 3 or queries.shape[0] != b or queries.shape[-1] != self.dim:
                raise ValueError(f"queries must have shape ({b}, n, {self.dim}), got {tuple(queries.shape)}")
            x = queries
        for layer in self.layers:
            x = layer(x, context, keep, has_context)
        return self.proj(self.norm(x))
