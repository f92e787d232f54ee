import pytest
import torch
from torch import nn

from mmlayers.layers.resampler import PerceiverResampler


def _make(**kw):
    torch.manual_seed(0)
    args = {"dim": 32, "num_queries": 5, "depth": 3, "cross_every": 2, "context_dim": 24,
            "num_heads": 4, "out_dim": 40}
    args.update(kw)
    return PerceiverResampler(**args).eval()


def test_shapes_and_cross_layout():
    r = _make(depth=5, cross_every=2)
    assert [layer.cross_attn is not None for layer in r.layers] == [True, False, True, False, True]
    out = r(torch.randn(3, 11, 24))
    assert out.shape == (3, 5, 40)
    paper = PerceiverResampler(dim=64, num_queries=8, depth=12, cross_every=2, num_heads=4)
    assert sum(layer.cross_attn is not None for layer in paper.layers) == 6


def test_padding_mask_ignores_padded_context():
    r = _make()
    ctx = torch.randn(2, 9, 24)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    pad[1, 2:] = True
    out = r(ctx, context_padding_mask=pad)
    noisy = ctx.clone()
    noisy[pad] = 1e4 * torch.randn(int(pad.sum()), 24)
    torch.testing.assert_close(r(noisy, context_padding_mask=pad), out, rtol=0, atol=1e-6)
    # same as running each row on its unpadded prefix
    torch.testing.assert_close(r(ctx[:1, :6]), out[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r(ctx[1:, :2]), out[1:], rtol=1e-5, atol=1e-6)
    # and the perturbation does matter where the mask is not set
    noisy_valid = ctx.clone()
    noisy_valid[0, 0] += 3.0 * torch.randn(24)
    assert (r(noisy_valid, context_padding_mask=pad)[0] - out[0]).abs().max() > 1e-3


def test_padding_mask_nan_in_padding_and_empty_rows():
    r = _make()
    ctx = torch.randn(2, 4, 24)
    pad = torch.tensor([[False, False, True, True], [True, True, True, True]])
    ctx[pad] = float("nan")
    out = r(ctx, context_padding_mask=pad)
    assert torch.isfinite(out).all()
    # an all-padding row gets no cross-attention: it equals a resampler without them
    no_cross = _make()
    for layer in no_cross.layers:
        layer.cross_attn = None
    torch.testing.assert_close(out[1], no_cross(ctx[1:, :1].nan_to_num())[0], rtol=1e-5, atol=1e-6)


def _manual_attention(attn, x, ctx, qk_norm):
    h = attn.num_heads
    b, n, d = x.shape
    q = attn.q(x).view(b, n, h, -1).transpose(1, 2)
    k, v = attn.kv(ctx).chunk(2, dim=-1)
    k = k.view(b, ctx.shape[1], h, -1).transpose(1, 2)
    v = v.view(b, ctx.shape[1], h, -1).transpose(1, 2)
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    return attn.proj((w @ v).transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_one_layer_against_manual_formula(qk_norm):
    r = _make(depth=1, qk_norm=qk_norm)
    for p in r.parameters():  # move every norm away from (1, 0)
        p.data.add_(0.1 * torch.randn_like(p))
    ctx = torch.randn(2, 7, 24)
    layer = r.layers[0]
    x = r.queries.expand(2, -1, -1)
    y = layer.norm1(x)
    x = x + _manual_attention(layer.self_attn, y, y, qk_norm)
    x = x + _manual_attention(layer.cross_attn, layer.norm_cross(x), layer.norm_context(ctx), qk_norm)
    x = x + layer.mlp(layer.norm2(x))
    want = r.proj(r.norm(x))
    torch.testing.assert_close(r(ctx), want, rtol=1e-5, atol=1e-5)
    assert isinstance(layer.self_attn.q_norm, nn.LayerNorm if qk_norm else nn.Identity)


def test_output_projection_init_and_custom_queries():
    r = PerceiverResampler(dim=256, num_queries=4, depth=1, num_heads=8, out_dim=512,
                           out_init_std=1e-3)
    assert r.proj.weight.std().item() == pytest.approx(1e-3, rel=0.05)
    assert torch.count_nonzero(r.proj.bias) == 0
    assert isinstance(_make(out_dim=None).proj, nn.Identity)
    small = _make()
    q = torch.randn(2, 3, 32)
    assert small(torch.randn(2, 4, 24), queries=q).shape == (2, 3, 40)


def test_gradients_reach_queries_and_layers():
    r = _make()
    r(torch.randn(2, 6, 24)).square().mean().backward()
    assert r.queries.grad.abs().sum() > 0
    assert r.layers[0].cross_attn.kv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("kwargs", "call", "match"), [
    ({"num_heads": 5}, None, "dim = 32 must be divisible by num_heads = 5"),
    ({"cross_every": 0}, None, "cross_every must be a positive integer, got 0"),
    ({}, {"context": torch.randn(2, 4, 23)}, r"context must have shape \(b, s, 24\), got \(2, 4, 23\)"),
    ({}, {"context": torch.randn(2, 4, 24), "context_padding_mask": torch.zeros(2, 4)},
     "context_padding_mask must be a bool tensor of shape"),
    ({}, {"context": torch.randn(2, 4, 24), "queries": torch.randn(2, 3, 31)},
     r"queries must have shape \(2, n, 32\)"),
])
def test_errors(kwargs, call, match):
    with pytest.raises(ValueError, match=match):
        r = _make(**kwargs)
        r(**call)
