"""QFormerResampler against an fp64 oracle written from the BLIP-2 Q-Former formula
(post-norm BERT layers, per-head qk LayerNorm), and against transformers' own Q-Former."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmlayers.layers.qformer import QFormerResampler

KW = dict(dim=16, num_queries=3, depth=3, cross_every=2, context_dim=12, num_heads=4,
          mlp_dim=24, dropout=0.0, attention_dropout=0.0)


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.4)
    return module


def oracle(sd, context, keep, *, depth, cross_every, heads, qk_norm, eps):
    """Q-Former forward from the state dict only (fp64)."""
    sd = {k: v.double() for k, v in sd.items()}
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)  # noqa: E731
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731

    def attn(x, ctx, p, mask):
        q, k, v = lin(x, p + ".query"), lin(ctx, p + ".key"), lin(ctx, p + ".value")
        split = lambda t: t.reshape(*t.shape[:-1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        if qk_norm:
            q, k = ln(q, p + ".q_norm"), ln(k, p + ".k_norm")
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = logits.softmax(-1) @ v
        return out.transpose(1, 2).reshape(*x.shape)

    b = context.shape[0]
    x = ln(sd["queries"].expand(b, -1, -1), "blip2qformer.layernorm")
    for i in range(depth):
        p = f"blip2qformer.encoder.layer.{i}"
        x = ln(x + lin(attn(x, x, p + ".attention.attention", None), p + ".attention.output.dense"),
               p + ".attention.output.LayerNorm")
        if i % cross_every == 0:
            a = attn(x, context, p + ".crossattention.attention", keep)
            x = ln(x + lin(a, p + ".crossattention.output.dense"),
                   p + ".crossattention.output.LayerNorm")
        h = F.gelu(lin(x, p + ".intermediate_query.dense"))
        x = ln(x + lin(h, p + ".output_query.dense"), p + ".output_query.LayerNorm")
    if "proj.weight" in sd:
        x = lin(x, "proj")
    return x


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_matches_formula_oracle(qk_norm, impl):
    r = randomize(QFormerResampler(**KW, qk_norm=qk_norm, out_dim=10, layer_norm_eps=1e-6,
                                   attn_implementation=impl).double()).eval()
    names = {k for k in r.state_dict() if "_norm" in k}
    assert bool(names) == qk_norm
    if qk_norm:  # self- and cross-attention both carry per-head norms
        assert "blip2qformer.encoder.layer.0.crossattention.attention.k_norm.weight" in names
        assert r.state_dict()["blip2qformer.encoder.layer.1.attention.attention.q_norm.weight"] \
            .shape == (4,)
    ctx = torch.randn(2, 5, 12, dtype=torch.float64)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad():
        got = r(ctx, context_padding_mask=pad)
    want = oracle(r.state_dict(), ctx, ~pad, depth=3, cross_every=2, heads=4, qk_norm=qk_norm,
                  eps=1e-6)
    assert got.shape == (2, 3, 10)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_without_qk_norm_equals_transformers_qformer():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    r = randomize(QFormerResampler(**KW, qk_norm=False).double()).eval()
    cfg = Blip2QFormerConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=24, cross_attention_frequency=2,
                             encoder_hidden_size=12)
    ref = Blip2QFormerModel(cfg).double().eval()
    ref.load_state_dict({k.removeprefix("blip2qformer."): v for k, v in r.state_dict().items()
                         if k.startswith("blip2qformer.")})
    ctx = torch.randn(3, 7, 12, dtype=torch.float64)
    with torch.no_grad():
        want = ref(query_embeds=r.queries, encoder_hidden_states=ctx).last_hidden_state
        got = r(ctx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_training_dropout_and_gradients():
    r = QFormerResampler(**{**KW, "dropout": 0.5})
    ctx = torch.randn(2, 5, 12)
    a, b = r(ctx), r(ctx)
    assert not torch.equal(a, b)  # dropout active in training mode
    r.eval()
    torch.testing.assert_close(r(ctx), r(ctx), rtol=0, atol=0)
    r.train()
    r(ctx).square().sum().backward()
    assert all(p.grad is not None for p in r.parameters())


def test_bad_inputs():
    r = QFormerResampler(**KW)
    with pytest.raises(ValueError, match=r"context must have shape \(b, s, 12\), got \(2, 5, 8\)"):
        r(torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match="context_padding_mask must be a bool tensor of shape"):
        r(torch.zeros(2, 5, 12), context_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"queries must have shape \(2 or 1, n, 16\)"):
        r(torch.zeros(2, 5, 12), queries=torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="dim = 18 must be divisible by num_heads = 4"):
        QFormerResampler(**{**KW, "dim": 18})
    with pytest.raises(ValueError, match="depth must be a positive integer, got 0"):
        QFormerResampler(**{**KW, "depth": 0})
