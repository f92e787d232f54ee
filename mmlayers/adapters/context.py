"""The LLM context of each image, summarised into a UNet's ``encoder_hidden_states``.

Shape key: b batch (one row per image) · n output tokens (77) · s context tokens ·
d width.

MM-Interleaved replaces the text-encoder embeddings of its Stable Diffusion UNet by a
fixed-length summary of the LLM hidden states that precede the image: the span from the
latest ``<s>`` at or before the image's ``<soi>`` through that ``<soi>``, reversed so that
``<soi>`` comes first, then::

    x   = Linear(reversed context) + sincos_1d(position)     # position 0 = <soi>
    out = PerceiverResampler(x)                              # (b, 77, d_unet)

A learnable negative embedding (77 × d_unet), initialised from the text encoder's
embedding of ``""`` when one is given, is the unconditional input of classifier-free
guidance; during training 10 % of the images use it instead of their context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmlayers.layers.posembed import official_sincos_1d, sincos_1d
from mmlayers.layers.qformer import QFormerResampler
from mmlayers.layers.resampler import PerceiverResampler

__all__ = ["ImageContextEncoder", "ImageContexts", "image_contexts"]


@dataclass
class ImageContexts:
    """Per-image context spans gathered from packed LLM hidden states.

    Attributes:
        hidden_states: (k, s, d) span of each image in sequence order (``<soi>`` last),
            left-aligned, zeros after ``lengths``.
        padding_mask: (k, s) bool, True = padding.
        lengths: (k,) long span lengths.
        rows: (k,) long, row of each image's ``<soi>``.
        soi_positions: (k,) long, position of each image's ``<soi>`` in its row.
        has_context: (k,) bool: the span holds a token other than ``<s>`` and ``<soi>``
            (images without one get no diffusion loss).
    """

    hidden_states: torch.Tensor
    padding_mask: torch.Tensor
    lengths: torch.Tensor
    rows: torch.Tensor
    soi_positions: torch.Tensor
    has_context: torch.Tensor


def image_contexts(hidden_states: torch.Tensor, input_ids: torch.Tensor, *, soi_id: int,
                   bos_id: int, max_length: int | None = None,
                   rule: str = "content") -> ImageContexts:
    """Gather the context span of every ``<soi>`` of a packed batch.

    The span of the ``<soi>`` at position t is positions ``latest <s> at or before t … t``
    (from 0 if the row has no earlier ``<s>``). Images are numbered row-major.

    Args:
        hidden_states: (b, n, d) LLM hidden states.
        input_ids: (b, n) token ids.
        soi_id: id of ``<soi>``.
        bos_id: id of ``<s>``.
        max_length: keep at most this many tokens per span (the ones nearest ``<soi>``).
        rule: which images get a diffusion loss (``has_context``): ``"content"`` (default):
            those whose span holds a token other than ``<s>`` and ``<soi>``; ``"official"``:
            those whose whole span is longer than 2 tokens, as the official code. They
            differ only for a row that starts inside a document with ``x <soi>`` (no
            ``<s>``): a context the content rule keeps and the official rule drops.

    Returns:
        [`ImageContexts`][mmlayers.adapters.context.ImageContexts] with k = number of ``<soi>`` tokens.

    Note:
        Two device→host copies (the ``<soi>`` positions and the longest span) size the
        output.

    Examples:
        >>> import torch
        >>> S, SOI, x = 1, 5, 9
        >>> ids = torch.tensor([[S, x, x, SOI, 7, S, SOI]])
        >>> h = torch.arange(7.0).reshape(1, 7, 1)
        >>> c = image_contexts(h, ids, soi_id=SOI, bos_id=S)
        >>> c.hidden_states[..., 0].tolist(), c.lengths.tolist(), c.has_context.tolist()
        ([[0.0, 1.0, 2.0, 3.0], [5.0, 6.0, 0.0, 0.0]], [4, 2], [True, False])
    """
    if not isinstance(hidden_states, torch.Tensor) or not isinstance(input_ids, torch.Tensor):
        raise TypeError("hidden_states and input_ids must be torch.Tensors")
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor of shape (b, n), got "
                         f"{input_ids.dtype} {tuple(input_ids.shape)}")
    if hidden_states.dim() != 3 or hidden_states.shape[:2] != input_ids.shape:
        raise ValueError(f"hidden_states must have shape (b, n, d) with (b, n) = "
                         f"{tuple(input_ids.shape)}, got {tuple(hidden_states.shape)}")
    if rule not in ("content", "official"):
        raise ValueError(f"rule must be 'content' or 'official', got {rule!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    b, n, d = hidden_states.shape
    pos = torch.arange(n, device=input_ids.device).expand(b, n)
    bos = torch.where(input_ids == bos_id, pos, -1).cummax(1).values.clamp(min=0)
    rows, soi = (input_ids == soi_id).nonzero(as_tuple=True)
    start = bos[rows, soi]
    if max_length is not None:
        start = torch.maximum(start, soi - max_length + 1)
    lengths = soi - start + 1
    s = int(lengths.max()) if lengths.numel() else 0
    offs = torch.arange(s, device=input_ids.device)
    idx = start[:, None] + offs  # (k, s)
    pad = offs >= lengths[:, None]
    gathered = hidden_states[rows[:, None], idx.clamp(max=n - 1)]
    gathered = gathered.masked_fill(pad[..., None], 0)
    ids = input_ids[rows[:, None], idx.clamp(max=n - 1)]
    special = (ids == bos_id) | (ids == soi_id) | pad
    has = ~special.all(1) if rule == "content" else soi - bos[rows, soi] + 1 > 2
    return ImageContexts(gathered, pad, lengths, rows, soi, has)


class ImageContextEncoder(nn.Module):
    """LLM context of one image → ``num_queries`` conditioning tokens for a UNet.

    Args:
        context_dim: LLM width (input width and width of the context Linear).
        out_dim: the UNet's ``cross_attention_dim`` (1024 for SD-2.1).
        num_queries: n output tokens (77, the CLIP text length).
        hidden_dim: resampler width (paper: 1024).
        depth: resampler layers (paper: 1).
        num_heads: resampler heads (paper: 16).
        uncond_prob: probability, in training mode, that an image's output is replaced by
            the negative embedding (0.1).
        resampler_kwargs: extra [`PerceiverResampler`][mmlayers.layers.resampler.PerceiverResampler]
            arguments (``qk_norm``, ``mlp_ratio``, …), or of the Q-Former.
        resampler: ``"perceiver"`` (default) or ``"qformer"``: the official post-norm
            BLIP-2 Q-Former ([`QFormerResampler`][mmlayers.layers.qformer.QFormerResampler];
            no qk-norm, no dropout, FFN 3072 unless ``resampler_kwargs`` says otherwise).
        pos_table: the 1-D position table added to the context: ``"exact"`` (default,
            [`sincos_1d`][mmlayers.layers.posembed.sincos_1d]) or ``"official"`` (the
            official float32 table,
            [`official_sincos_1d`][mmlayers.layers.posembed.official_sincos_1d]; up to 2e-4
            away from the exact one at long contexts).
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Shapes:
        ``forward(context (b, s, context_dim), padding_mask (b, s) bool)`` → (b, n, out_dim).
        ``context`` is in sequence order (``<soi>`` last of each row's valid part, padding
        after it, as [`image_contexts`][mmlayers.adapters.context.image_contexts] returns); it is reversed inside.

    Examples:
        >>> import torch
        >>> enc = ImageContextEncoder(context_dim=16, out_dim=8, num_queries=5, hidden_dim=16,
        ...                           num_heads=2)
        >>> ctx, pad = torch.randn(3, 6, 16), torch.zeros(3, 6, dtype=torch.bool)
        >>> pad[1, 4:] = True
        >>> enc.eval()(ctx, pad).shape
        torch.Size([3, 5, 8])
        >>> drop = torch.tensor([False, True, False])  # row 1 → the negative embedding
        >>> torch.equal(enc(ctx, pad, drop=drop)[1], enc.negative_embedding)
        True
    """

    def __init__(self, *, context_dim: int, out_dim: int, num_queries: int = 77,
                 hidden_dim: int = 1024, depth: int = 1, num_heads: int = 16,
                 uncond_prob: float = 0.1, resampler_kwargs: dict | None = None,
                 resampler: str = "perceiver", pos_table: str = "exact",
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("context_dim", context_dim), ("out_dim", out_dim),
                        ("num_queries", num_queries)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if context_dim % 2:
            raise ValueError(f"context_dim must be even (1-D sincos), got {context_dim}")
        if not 0.0 <= uncond_prob <= 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1], got {uncond_prob!r}")
        kw = {"device": device, "dtype": dtype}
        self.context_dim, self.out_dim, self.num_queries = context_dim, out_dim, num_queries
        self.uncond_prob = float(uncond_prob)
        if pos_table not in ("exact", "official"):
            raise ValueError(f"pos_table must be 'exact' or 'official', got {pos_table!r}")
        self.pos_table = pos_table
        self._official_pos = torch.zeros(0, context_dim)  # grown on demand, not saved
        self.proj = nn.Linear(context_dim, context_dim, **kw)
        if resampler not in ("perceiver", "qformer"):
            raise ValueError(f"resampler must be 'perceiver' or 'qformer', got {resampler!r}")
        rkw = dict(resampler_kwargs or {})
        if resampler == "qformer":  # the official context encoder's settings
            rkw = {"qk_norm": False, "dropout": 0.0, "attention_dropout": 0.0, **rkw}
        self.resampler = (QFormerResampler if resampler == "qformer" else PerceiverResampler)(
            dim=hidden_dim, num_queries=num_queries, depth=depth, cross_every=1,
            context_dim=context_dim, num_heads=num_heads,
            out_dim=None if out_dim == hidden_dim else out_dim, **rkw, **kw)
        self.negative_embedding = nn.Parameter(torch.empty(num_queries, out_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Context Linear: PyTorch default; resampler: its own init; negative N(0, 0.02)."""
        self.proj.reset_parameters()
        self.resampler.reset_parameters()
        nn.init.normal_(self.negative_embedding, std=0.02)

    @torch.no_grad()
    def init_negative(self, embedding: torch.Tensor) -> None:
        """Copy ``embedding`` (n, out_dim) or (1, n, out_dim), e.g. a text encoder's
        ``last_hidden_state`` for ``""``, into the negative embedding."""
        e = embedding[0] if embedding.dim() == 3 and embedding.shape[0] == 1 else embedding
        if tuple(e.shape) != tuple(self.negative_embedding.shape):
            raise ValueError(f"negative embedding must have shape "
                             f"{tuple(self.negative_embedding.shape)} (or with a leading 1), "
                             f"got {tuple(embedding.shape)}")
        self.negative_embedding.copy_(e)

    def negative(self, batch: int) -> torch.Tensor:
        """The negative embedding expanded to (batch, n, out_dim)."""
        return self.negative_embedding.expand(batch, -1, -1)

    def forward(self, context: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                drop: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """See the class docstring.

        Args:
            drop: (b,) bool: rows to replace by the negative embedding. Default: in
                training mode each row with probability ``uncond_prob`` (drawn with
                ``generator``), none in eval mode.
            context: (b, s, context_dim) LLM hidden states of each image's span, in sequence
                order (as [`image_contexts`][mmlayers.adapters.context.image_contexts] returns them).
            padding_mask: (b, s) bool, True = padding; default: no padding.
            generator: seeds the random choice of ``drop`` in training mode.
        """
        if not isinstance(context, torch.Tensor) or context.dim() != 3 \
                or context.shape[-1] != self.context_dim:
            raise ValueError(f"context must have shape (b, s, context_dim={self.context_dim}), "
                             f"got {tuple(getattr(context, 'shape', ()))}")
        b, s, _ = context.shape
        if padding_mask is None:
            padding_mask = torch.zeros(b, s, dtype=torch.bool, device=context.device)
        elif padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != (b, s):
            raise ValueError(f"padding_mask must be a bool tensor of shape {(b, s)} "
                             f"(True = padding), got {padding_mask.dtype} "
                             f"{tuple(padding_mask.shape)}")
        lengths = (~padding_mask).sum(1, keepdim=True)
        offs = torch.arange(s, device=context.device)
        src = (lengths - 1 - offs).clamp(min=0)  # reversed valid part, left-aligned
        x = context.gather(1, src[..., None].expand(b, s, self.context_dim))
        mask = offs >= lengths
        if self.pos_table == "official":
            if self._official_pos.shape[0] < s:
                self._official_pos = official_sincos_1d(max(s, 2048), self.context_dim)
            pos = self._official_pos[:s].to(context.device, self.proj.weight.dtype)
        else:
            pos = sincos_1d(s, self.context_dim, device=context.device,
                            dtype=self.proj.weight.dtype)
        x = self.proj(x.to(self.proj.weight.dtype)) + pos
        out = self.resampler(x, context_padding_mask=mask)
        if drop is None and self.training and self.uncond_prob > 0:
            drop = torch.rand(b, generator=generator, device=generator.device if generator
                              is not None else "cpu").to(context.device) < self.uncond_prob
        if drop is not None:
            if tuple(drop.shape) != (b,):
                raise ValueError(f"drop must have shape ({b},), got {tuple(drop.shape)}")
            out = torch.where(drop.to(out.device, torch.bool)[:, None, None],
                              self.negative_embedding.to(out.dtype), out)
        return out
