"""image_contexts against a Python loop; ImageContextEncoder against its formula."""

from __future__ import annotations

import pytest
import torch

from mmlayers.adapters.diffusion import ImageContextEncoder, image_contexts
from mmlayers.layers.posembed import sincos_1d

BOS, SOI, IMG = 1, 5, 7




def loop_spans(ids, max_length=None):
    out = []
    for r, row in enumerate(ids.tolist()):
        for t, tok in enumerate(row):
            if tok != SOI:
                continue
            start = max([i for i in range(t + 1) if row[i] == BOS], default=0)
            if max_length is not None:
                start = max(start, t - max_length + 1)
            span = row[start:t + 1]
            out.append((r, t, start, any(v not in (BOS, SOI) for v in span)))
    return out


@pytest.mark.parametrize("max_length", [None, 3])
def test_image_contexts_match_loop(max_length):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, 20, (3, 24), generator=g)
    ids[0, [0, 4, 10, 15]] = torch.tensor([BOS, SOI, SOI, BOS])
    ids[0, 16] = SOI  # <s><soi>: empty context
    ids[1, [3, 9, 20]] = torch.tensor([SOI, BOS, SOI])  # first <soi> has no <s> before it
    ids[2, [0, 1]] = torch.tensor([BOS, SOI])  # empty; row 2 has no other image
    hidden = torch.randn(3, 24, 6, generator=g)
    c = image_contexts(hidden, ids, soi_id=SOI, bos_id=BOS, max_length=max_length)
    spans = loop_spans(ids, max_length)
    assert c.rows.tolist() == [s[0] for s in spans]
    assert c.soi_positions.tolist() == [s[1] for s in spans]
    assert c.has_context.tolist() == [s[3] for s in spans]
    for i, (r, t, start, _) in enumerate(spans):
        n = t - start + 1
        assert c.lengths[i] == n and c.padding_mask[i].tolist() == [j >= n for j in
                                                                    range(c.padding_mask.shape[1])]
        assert torch.equal(c.hidden_states[i, :n], hidden[r, start:t + 1])
        assert not c.hidden_states[i, n:].any()
    if max_length is None:  # known answer
        assert c.has_context.tolist() == [True, True, False, True, True, False]


def test_image_contexts_bad_input():
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        image_contexts(torch.zeros(2, 5, 4), torch.zeros(2, 6, dtype=torch.long), soi_id=SOI,
                       bos_id=BOS)
    with pytest.raises(ValueError, match="input_ids"):
        image_contexts(torch.zeros(2, 5, 4), torch.zeros(2, 5), soi_id=SOI, bos_id=BOS)


def small_encoder(**kw):
    torch.manual_seed(0)
    return ImageContextEncoder(context_dim=16, out_dim=12, num_queries=6, hidden_dim=16,
                               num_heads=2, **kw).eval()


def test_encoder_matches_formula_and_ignores_padding():
    enc = small_encoder()
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(2, 5, 16, generator=g)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    out = enc(ctx, pad)
    for i, n in enumerate((5, 3)):  # oracle: one row at a time, reversed by hand
        x = enc.proj(ctx[i, :n].flip(0)) + sincos_1d(n, 16)
        torch.testing.assert_close(out[i], enc.resampler(x[None])[0], rtol=1e-5, atol=1e-6)
    poisoned = ctx.clone()
    poisoned[1, 3:] = float("nan")
    torch.testing.assert_close(enc(poisoned, pad), out)
    assert out.shape == (2, 6, 12)


def test_negative_embedding_and_context_dropout():
    enc = small_encoder(uncond_prob=0.25)
    ctx = torch.randn(400, 3, 16)
    e = torch.randn(1, 6, 12)
    enc.init_negative(e)
    assert torch.equal(enc.negative(2), e.expand(2, 6, 12))
    with torch.no_grad():
        cond = enc(ctx)  # eval: no dropout
        assert not (cond == e).all(-1).all(-1).any()
        enc.train()
        a = enc(ctx, generator=torch.Generator().manual_seed(3))
        b = enc(ctx, generator=torch.Generator().manual_seed(3))
    dropped = (a == e).all(-1).all(-1)
    assert torch.equal(a, b)
    assert 0.17 < dropped.float().mean() < 0.33  # 100 ± 8.7 expected of 400
    torch.testing.assert_close(a[~dropped], cond[~dropped])
    enc.uncond_prob = 1.0
    assert (enc(ctx[:3]) == e).all()
    with pytest.raises(ValueError, match="negative embedding must have shape"):
        enc.init_negative(torch.zeros(7, 12))


def test_encoder_bad_input():
    enc = small_encoder()
    with pytest.raises(ValueError, match="context_dim=16"):
        enc(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match="padding_mask"):
        enc(torch.randn(2, 5, 16), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="uncond_prob"):
        ImageContextEncoder(context_dim=16, out_dim=8, uncond_prob=1.5)


def test_qformer_context_encoder_official_settings():
    from mmlayers.layers.qformer import QFormerResampler

    enc = small_encoder(resampler="qformer")
    r = enc.resampler
    assert isinstance(r, QFormerResampler) and not r.qk_norm
    assert r.blip2qformer.config.hidden_dropout_prob == 0.0
    assert r.blip2qformer.config.attention_probs_dropout_prob == 0.0
    assert r.blip2qformer.config.num_hidden_layers == 1
    assert r.blip2qformer.config.encoder_hidden_size == 16
    assert not any("_norm" in k for k in r.state_dict())
    assert isinstance(r.proj, torch.nn.Linear)  # 16 wide -> 12 (out_dim)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(2, 5, 16, generator=g)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    out = enc(ctx, pad)
    for i, n in enumerate((5, 3)):
        x = enc.proj(ctx[i, :n].flip(0)) + sincos_1d(n, 16)
        torch.testing.assert_close(out[i], r(x[None])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="resampler must be 'perceiver' or 'qformer', got 'x'"):
        small_encoder(resampler="x")


def test_image_context_rule_official_drops_continuation_rows():
    """Which images get a diffusion loss, by hand: the official rule keeps contexts longer
    than 2 tokens; ours keeps contexts with a token other than <s> / <soi>."""
    S, SOI, IMG, x, y, P = 1, 5, 6, 9, 8, 0
    ids = torch.tensor([[x, SOI, IMG, P],      # continuation row: "x <soi>"
                        [S, SOI, IMG, P],      # "<s> <soi>"
                        [S, x, SOI, IMG],      # "<s> x <soi>"
                        [x, y, SOI, IMG],      # continuation, two tokens
                        [SOI, IMG, x, P]])     # the row starts at <soi>
    h = torch.zeros(5, 4, 2)
    content = image_contexts(h, ids, soi_id=SOI, bos_id=S).has_context.tolist()
    official = image_contexts(h, ids, soi_id=SOI, bos_id=S, rule="official").has_context.tolist()
    assert content == [True, False, True, True, False]
    assert official == [False, False, True, True, False]
    # max_length shortens the span, not the official decision
    short = image_contexts(h, ids, soi_id=SOI, bos_id=S, rule="official", max_length=1)
    assert short.has_context.tolist() == official and short.lengths.tolist() == [1] * 5
    with pytest.raises(ValueError, match="rule must be 'content' or 'official', got 'x'"):
        image_contexts(h, ids, soi_id=SOI, bos_id=S, rule="x")



def test_official_1d_context_table():
    """pos_table='official': the context gets the official float32 1-D table (written out
    here with NumPy float32 arithmetic), not the exact one."""
    import numpy as np

    enc = small_encoder(pos_table="official").double()
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 5, 16, generator=g, dtype=torch.float64)
    om = np.float32(1.0) / np.float32(10000.0) ** (np.arange(8, dtype=np.float32) / np.float32(8))
    ang = np.arange(5, dtype=np.float32)[:, None] * om
    table = torch.from_numpy(np.concatenate([np.sin(ang), np.cos(ang)], 1)).double()
    with torch.no_grad():
        out = enc(ctx)
        want = enc.resampler((enc.proj(ctx[0].flip(0)) + table)[None])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    with torch.no_grad():  # the exact table differs in the float32 digits
        exact = small_encoder().double()
        exact.load_state_dict(enc.state_dict())
        assert not torch.equal(exact(ctx), out)
    with pytest.raises(ValueError, match="pos_table must be 'exact' or 'official', got 'yx'"):
        small_encoder(pos_table="yx")
