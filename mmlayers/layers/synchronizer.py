"""Multi-image multi-scale feature synchronizer (MMFS, MM-Interleaved §3.2).

Shape key: b batch · n query tokens · m images · l pyramid levels · s flattened tokens of
one image's pyramid (Σ_l size_l²) · h heads · p sampling points · d width · dh head width.

Every query reads, with deformable sparse attention, a few learned points per head, per
level, per image from the multi-scale maps of the images it may see. For query ``q`` and
image ``k`` with relative position ``r_k`` (most recent visible image 1, the one before 2,
…; invisible images 0)::

    q_k      = W_q q + b_q + E[r_k]                      # E: (max_images, dq) table
    offset_k = W_o q_k + b_o                              # (h, p, 2), shared by levels
    loc_kl   = ref + offset_k · (size_l / base_size) / size_l
    logit_kl = W_a q_k + b_a                              # (h, p) per level
    A        = softmax over all (k, l, p) and one null slot of logit 0
    out      = W_out · Σ_{k visible, l, p} A · bilinear(V_kl, loc_kl) + b_out

The official module gives every (image, level) an extra "ignore" slot with logit
−log(m·l) and a zero value, and adds −10000 to the logits of invisible images. The m·l
ignore slots add exactly 1 to the softmax denominator (one slot of logit 0) and nothing to
the numerator, and exp(logit − 10000) underflows to 0 in every float format, so the formula
above is the same function. It is computed faster than the official code:

- the projections are affine, so ``W_o W_q q`` and ``W_a W_q q`` are computed once per token
  and the per-image terms ``W_o E[r]`` and ``W_a E[r]`` come from a (max_images, ·) table,
  instead of repeating the query m times before a dq×dq Linear; when there are more query
  tokens than offset and logit rows (h·p·2 + h·l·p), the weight products ``W_o W_q`` and
  ``W_a W_q`` are formed first, which costs fewer FLOPs than ``W_q q``;
- invisible images are never sampled: every visible (query, image) pair is one "query" of a
  single deformable-attention call with p points per level, reading its image in per-level
  "tall" maps where the images of a row are stacked vertically with one zero row between
  them (samples that leave their image are given weight 0, which is what zero padding
  gives them in the official op); pair outputs are summed per query, and the joint softmax
  is a segment softmax over the pairs of a query. The tall layout costs one copy of the
  values; [`FeatureSynchronizer.prepare_values`][mmlayers.layers.synchronizer.FeatureSynchronizer.prepare_values] builds it once for many calls (e.g.
  the decoding steps of one prompt).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmlayers.layers._sync_layout import PreparedValues, segment_softmax, tall_layout
from mmlayers.ops.deform_attn import multi_scale_deformable_attention

__all__ = ["FeatureSynchronizer", "PreparedValues", "relative_image_positions"]

_OFFICIAL_KEYS = ("dynamic_offset_mask.weight", "dynamic_offset_mask.bias",
                  "sampling_offsets.weight", "sampling_offsets.bias",
                  "attention_weights.weight", "attention_weights.bias",
                  "value_proj.weight", "value_proj.bias",
                  "output_proj.weight", "output_proj.bias", "query_relpos.weight")


def relative_image_positions(visibility: torch.Tensor) -> torch.Tensor:
    """Relative image index of every (query, image) pair.

    Among the images a query may see, the most recent (highest index) is 1, the one before
    it 2, …; images it may not see are 0.

    Args:
        visibility: (b, n, m) or (b, m) bool.

    Returns:
        long tensor of the same shape.

    Examples:
        >>> import torch
        >>> vis = torch.tensor([[True, False, True, True]])
        >>> relative_image_positions(vis).tolist()
        [[3, 0, 2, 1]]
    """
    v = visibility.long()
    return (v.sum(-1, keepdim=True) + 1 - v.cumsum(-1)) * v


class FeatureSynchronizer(nn.Module):
    """Queries read fine-grained features of the images they may see (MMFS).

    Args:
        dim: attention width d (value_proj output, output_proj input); divisible by heads.
        query_dim: query width dq.
        value_dim: image feature width dv.
        out_dim: output width; default ``dim``.
        heads: h, attention heads.
        points: p, sampling points per head, level and image.
        level_sizes: side of each square pyramid level of one image, e.g. (32, 16, 8).
        base_size: offsets are multiplied by ``size_l / base_size`` (16 in the LLM).
        offset_init: sampling-offset biases start uniform in ±offset_init (3 LLM, 1 UNet).
        max_images: rows of the relative-position table; at most ``max_images − 1`` images
            (row 0 is the "invisible" position).
        backend: deformable-attention backend (see ``multi_scale_deformable_attention``).
        query_chunk: at most this many queries per deformable-attention call (bounds the
            per-call working state); ``None`` (default): one call for all queries, which
            is fastest (each call has a fixed cost proportional to the value maps).
        device: device of the parameters (``None``: the default device).
        dtype: dtype of the parameters (``None``: the default dtype).

    Differences from the official module (all exact, see the module docstring): the
    dq→dq query Linear is named ``query_proj`` (officially ``dynamic_offset_mask``); the
    logit Linear has no rows for the ignore slots (their logits are overwritten, so those
    weights are dead); the zero ``ignore_token`` is not stored; a (b, n', m) visibility with
    n' ≠ n is an error instead of silently using its last row.
    [`load_official_state_dict`][mmlayers.layers.synchronizer.FeatureSynchronizer.load_official_state_dict] maps released weights.

    Examples:
        >>> import torch
        >>> sync = FeatureSynchronizer(dim=32, query_dim=24, value_dim=16, heads=4, points=2,
        ...                            level_sizes=(4, 2), base_size=2)
        >>> query = torch.randn(2, 5, 24)                   # (b, n, dq)
        >>> features = torch.randn(2, 3, 4 * 4 + 2 * 2, 16)  # (b, m, s, dv)
        >>> visibility = torch.tensor([[True, True, False], [True, False, False]])
        >>> sync(query, features, visibility).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, *, dim: int, query_dim: int, value_dim: int, out_dim: int | None = None,
                 heads: int = 16, points: int = 8, level_sizes: Sequence[int] = (32, 16, 8),
                 base_size: int = 16, offset_init: float = 3.0, max_images: int = 50,
                 backend: str | None = None, query_chunk: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        for name, v in (("dim", dim), ("query_dim", query_dim), ("value_dim", value_dim),
                        ("out_dim", out_dim), ("heads", heads), ("points", points),
                        ("base_size", base_size), ("max_images", max_images),
                        ("query_chunk", 1 if query_chunk is None else query_chunk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        level_sizes = tuple(level_sizes)
        if not level_sizes or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                                  for x in level_sizes):
            raise ValueError(f"level_sizes must be a non-empty sequence of positive ints "
                             f"(square level sides), got {level_sizes!r}")
        self.dim, self.query_dim, self.value_dim, self.out_dim = dim, query_dim, value_dim, out_dim
        self.heads, self.points, self.level_sizes = heads, points, level_sizes
        self.base_size, self.offset_init, self.max_images = base_size, float(offset_init), max_images
        self.backend, self.query_chunk = backend, query_chunk
        kw = {"device": device, "dtype": dtype}
        levels = len(level_sizes)
        self.query_proj = nn.Linear(query_dim, query_dim, **kw)
        self.query_relpos = nn.Embedding(max_images, query_dim, **kw)
        self.sampling_offsets = nn.Linear(query_dim, heads * points * 2, **kw)
        self.attention_weights = nn.Linear(query_dim, heads * levels * points, **kw)
        self.value_proj = nn.Linear(value_dim, dim, **kw)
        self.output_proj = nn.Linear(dim, out_dim, **kw)
        self.reset_parameters()

    @property
    def tokens_per_image(self) -> int:
        """s = Σ_l size_l², the length of one image's flattened pyramid."""
        return sum(x * x for x in self.level_sizes)

    def reset_parameters(self) -> None:
        """The official initialisation (xavier projections, zero offset weights, ±offset_init
        offset biases, zero logit bias, relpos N(0, 0.02))."""
        self.query_proj.reset_parameters()
        nn.init.zeros_(self.query_proj.bias)
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.uniform_(-self.offset_init, self.offset_init)
        self.attention_weights.reset_parameters()
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.query_relpos.weight, std=0.02)

    def project_values(self, features: torch.Tensor) -> torch.Tensor:
        """``value_proj`` of image features: (b, m, s, dv) → (b, m, s, d).

        Pass the result as ``values=`` to reuse it across calls (e.g. decoding steps).
        """
        self._check_features(features, "features", self.value_dim)
        return self.value_proj(features)

    def _check_features(self, x, name: str, width: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        s = self.tokens_per_image
        if x.dim() != 4 or x.shape[2] != s or x.shape[3] != width:
            raise ValueError(
                f"{name} must have shape (b, m, s={s}, {width}) for level_sizes "
                f"{self.level_sizes} (s = Σ size²), got {tuple(x.shape)}")

    def prepare_values(self, features: torch.Tensor | None = None, *,
                       values: torch.Tensor | None = None) -> PreparedValues:
        """Project (if needed) and lay out image values once, for several ``forward`` calls.

        Args:
            features: (b, m, s, dv) image pyramids; or
            values: (b, m, s, d) from [`project_values`][mmlayers.layers.synchronizer.FeatureSynchronizer.project_values].

        Returns:
            a [`PreparedValues`][mmlayers.layers._sync_layout.PreparedValues] to pass as ``forward(..., values=prepared)``; the
            outputs are exactly those of the raw path. Under ``torch.no_grad()`` it can be
            reused for every decoding step of one prompt; with grad it carries the graph to
            the features.

        Examples:
            >>> import torch
            >>> sync = FeatureSynchronizer(dim=8, query_dim=6, value_dim=4, heads=2, points=2,
            ...                            level_sizes=(2, 1), base_size=2)
            >>> feats = torch.randn(1, 3, 5, 4)                          # (b, m, s, dv)
            >>> prepared = sync.prepare_values(feats)
            >>> query = torch.randn(1, 4, 6)
            >>> torch.equal(sync(query, values=prepared), sync(query, feats))
            True
        """
        if (features is None) == (values is None):
            raise ValueError("pass exactly one of features (b, m, s, dv) and values "
                             "(b, m, s, d) from project_values")
        if values is None:
            values = self.project_values(features)
        else:
            self._check_features(values, "values", self.dim)
        m = values.shape[1]
        if m >= self.max_images:
            raise ValueError(f"got m={m} images but max_images={self.max_images} allows at "
                             f"most {self.max_images - 1} (relative position 0 is reserved)")
        return PreparedValues(tall_layout(values, self.level_sizes, self.heads), m,
                              self.level_sizes)

    def forward(self, query: torch.Tensor, features: torch.Tensor | None = None,
                visibility: torch.Tensor | None = None, *,
                values: torch.Tensor | PreparedValues | None = None,
                reference_points: torch.Tensor | None = None) -> torch.Tensor:
        """Synchronise queries with the images they may see.

        Args:
            query: (b, n, dq).
            features: (b, m, s, dv) image pyramids, levels flattened row-major and
                concatenated in ``level_sizes`` order. Give this or ``values``.
            visibility: (b, m) or (b, n, m), bool (or 0/1); ``None``: every image visible to
                every query. A query that sees no image gets ``output_proj(0)``.
            values: (b, m, s, d) from [`project_values`][mmlayers.layers.synchronizer.FeatureSynchronizer.project_values], or a [`PreparedValues`][mmlayers.layers._sync_layout.PreparedValues]
                from [`prepare_values`][mmlayers.layers.synchronizer.FeatureSynchronizer.prepare_values] (no per-call re-layout), instead of
                ``features``.
            reference_points: (b, n, 2) or (1, n, 2) normalised (x, y); default the image
                centre (0.5, 0.5).

        Returns:
            (b, n, out_dim) in the query's dtype.

        Note:
            One small device→host synchronisation per call (two when b > 1): the number of
            visible (query, image) pairs sizes the sampling call.
        """
        q, prep, vis, ref = self._validate(query, features, visibility, values, reference_points)
        b, n, _ = q.shape
        cdt = torch.float64 if torch.float64 in (q.dtype, prep.tall.dtype) else torch.float32
        lin_o, lin_a = self.sampling_offsets, self.attention_weights
        if b * n > lin_o.out_features + lin_a.out_features:
            # fewer FLOPs through the products of the weights (h·p·2 + h·l·p rows · dq²)
            # than through W_q q (b·n · dq²): the same affine map, re-associated
            w_q, b_q = self.query_proj.weight, self.query_proj.bias
            off = F.linear(q, lin_o.weight @ w_q, lin_o(b_q))
            logit = F.linear(q, lin_a.weight @ w_q, lin_a(b_q))
        else:
            qp = self.query_proj(q)
            off, logit = lin_o(qp), lin_a(qp)
        table = self.query_relpos.weight[:prep.images + 1]
        tabs = (F.linear(table, self.sampling_offsets.weight),
                F.linear(table, self.attention_weights.weight))
        chunk = self.query_chunk or n
        if n <= chunk:
            out = self._read(prep, vis, off, logit, ref, *tabs, cdt)
        else:
            ref = None if ref is None else ref.expand(b, n, 2)
            out = torch.cat([self._read(prep, vis[:, i:i + chunk], off[:, i:i + chunk],
                                        logit[:, i:i + chunk],
                                        None if ref is None else ref[:, i:i + chunk], *tabs, cdt)
                             for i in range(0, n, chunk)], dim=1)
        return self.output_proj(out.to(off.dtype))

    def _validate(self, query, features, visibility, values, reference_points):
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
        if query.dim() != 3 or query.shape[-1] != self.query_dim:
            raise ValueError(f"query must have shape (b, n, query_dim={self.query_dim}), "
                             f"got {tuple(query.shape)}")
        if (features is None) == (values is None):
            raise ValueError("pass exactly one of features (b, m, s, dv) and values "
                             "(b, m, s, d) from project_values or prepare_values")
        if isinstance(values, PreparedValues):
            prep = values
            if (prep.dim, prep.heads, prep.level_sizes) != (self.dim, self.heads,
                                                            self.level_sizes):
                raise ValueError(f"prepared values have dim={prep.dim}, heads={prep.heads}, "
                                 f"level_sizes={prep.level_sizes}; this layer expects "
                                 f"{self.dim}, {self.heads}, {self.level_sizes}")
        else:
            prep = self.prepare_values(features, values=values)
        b, n, _ = query.shape
        m = prep.images
        if prep.batch != b:
            raise ValueError(f"image batch {prep.batch} does not match query batch {b}")
        if visibility is None:
            vis = torch.ones(b, n, m, dtype=torch.bool, device=query.device)
        else:
            if not isinstance(visibility, torch.Tensor):
                raise TypeError(f"visibility must be a torch.Tensor, got "
                                f"{type(visibility).__name__}")
            if tuple(visibility.shape) not in ((b, m), (b, n, m)):
                raise ValueError(f"visibility must have shape (b, m)={(b, m)} or (b, n, m)="
                                 f"{(b, n, m)}, got {tuple(visibility.shape)}")
            vis = visibility if visibility.dtype == torch.bool else visibility != 0
            if vis.dim() == 2:
                vis = vis[:, None].expand(b, n, m)
        if reference_points is None:
            ref = None  # the image centre (0.5, 0.5)
        else:
            ref = reference_points
            if ref.dim() != 3 or ref.shape[0] not in (1, b) or tuple(ref.shape[1:]) != (n, 2):
                raise ValueError(f"reference_points must have shape (b, n, 2)={(b, n, 2)} or "
                                 f"(1, n, 2), got {tuple(ref.shape)}")
        return query, prep, vis, ref

    def _read(self, prep, vis, off, logit, ref, off_tab, logit_tab, cdt):
        """Σ over each query's visible images with one deformable call → (b, n, d).

        Every visible (query, image) pair becomes one "query" of the op with p points per
        level, reading its image in the tall maps; pair outputs are summed per query.
        """
        b, n, _ = off.shape
        h, p, n_lv, m = self.heads, self.points, len(self.level_sizes), prep.images
        out = off.new_zeros(b * n, self.dim, dtype=prep.tall.dtype)
        bi, ti, ki = vis.nonzero(as_tuple=True)  # sorted by (row, query, image); host sync
        if bi.numel() == 0:
            return out.view(b, n, -1)
        qi = bi * n + ti
        r = relative_image_positions(vis)[bi, ti, ki]
        lg = logit.reshape(b * n, -1).index_select(0, qi) + logit_tab.index_select(0, r)
        weight = segment_softmax(lg.to(cdt).view(-1, h, n_lv * p), qi, b * n)
        o = off.reshape(b * n, -1).index_select(0, qi) + off_tab.index_select(0, r)
        # normalised (x, y) in the image, the same at every level: (size / base) / size = 1 / base
        xy = o.to(cdt).view(-1, h, 1, p, 2) / self.base_size
        xy = xy + (0.5 if ref is None else
                   ref.to(cdt).expand(b, n, 2).reshape(b * n, 1, 1, 1, 2).index_select(0, qi))
        sizes = torch.tensor(self.level_sizes, dtype=cdt, device=xy.device)[:, None]  # (l, 1)
        py = xy[..., 1] * sizes  # (P, h, l, p): pixel row + 0.5 inside the image
        rows = sizes + 1  # image rows + its zero row in the tall map
        ty = (ki.to(cdt)[:, None, None, None] * rows + py) / (m * rows)
        loc = torch.stack((xy[..., 0].expand_as(ty), ty), -1)  # (P, h, l, p, 2)
        # rows -1 … size read the own image or a zero row; farther samples are dropped
        w = weight.view(-1, h, n_lv, p) * ((py > -0.5) & (py < sizes + 0.5))
        if b == 1:
            res = multi_scale_deformable_attention(prep.value(), prep.spatial_shapes(), None,
                                                   loc[None], w[None], backend=self.backend)[0]
        else:  # the op wants the same number of pairs per row: pad with weight-0 pairs
            counts = torch.bincount(bi, minlength=b)
            j = torch.arange(bi.numel(), device=bi.device) - (counts.cumsum(0) - counts)[bi]
            width = int(counts.max())  # host sync
            loc = loc.new_zeros(b, width, *loc.shape[1:]).index_put((bi, j), loc)
            w = w.new_zeros(b, width, *w.shape[1:]).index_put((bi, j), w)
            res = multi_scale_deformable_attention(prep.value(), prep.spatial_shapes(), None,
                                                   loc, w, backend=self.backend)[bi, j]
        return out.index_add(0, qi, res).view(b, n, -1)

    @torch.no_grad()
    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                                 prefix: str = "") -> None:
        """Load the weights of one official ``MMFS`` module.

        ``state_dict`` holds the official keys (``dynamic_offset_mask``, ``sampling_offsets``,
        ``attention_weights``, ``value_proj``, ``output_proj``, ``query_relpos``,
        ``ignore_token``) under ``prefix`` (e.g. ``"model.layers.0.llama_cross_attn.attn."``).
        The ignore-slot rows of ``attention_weights`` are dropped (their logits are
        overwritten in the official forward); ``ignore_token`` must be all zeros.

        Raises:
            ValueError: a missing key, a shape that does not match this layer, or a
                non-zero ``ignore_token``.
        """
        sd = {k: state_dict[prefix + k] for k in _OFFICIAL_KEYS if prefix + k in state_dict}
        missing = [prefix + k for k in _OFFICIAL_KEYS if k not in sd]
        if missing:
            raise ValueError(f"official MMFS state dict lacks {missing}")
        ignore = state_dict.get(prefix + "ignore_token")
        if ignore is not None and bool(ignore.ne(0).any()):
            raise ValueError(f"{prefix}ignore_token is not all zeros; this layer assumes "
                             "the official zero ignore value")
        h, n_lv, p = self.heads, len(self.level_sizes), self.points
        aw, ab = sd.pop("attention_weights.weight"), sd.pop("attention_weights.bias")
        if aw.shape != (h * n_lv * (p + 1), self.query_dim):
            raise ValueError(f"{prefix}attention_weights.weight has shape {tuple(aw.shape)}; "
                             f"expected {(h * n_lv * (p + 1), self.query_dim)} for heads={h}, "
                             f"levels={n_lv}, points={p}")
        sd["attention_weights.weight"] = rearrange(
            aw, "(h l p) d -> h l p d", h=h, l=n_lv)[:, :, :p].reshape(-1, self.query_dim)
        sd["attention_weights.bias"] = rearrange(ab, "(h l p) -> h l p", h=h, l=n_lv)[
            :, :, :p].reshape(-1)
        sd["query_proj.weight"] = sd.pop("dynamic_offset_mask.weight")
        sd["query_proj.bias"] = sd.pop("dynamic_offset_mask.bias")
        own = self.state_dict()
        for k, t in sd.items():
            if t.shape != own[k].shape:
                raise ValueError(f"official {k} has shape {tuple(t.shape)}; this layer "
                                 f"expects {tuple(own[k].shape)}")
        self.load_state_dict(sd)
