"""FeatureSynchronizer against a plain per-image re-statement of the official MMFS."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from mmlayers.layers._sync_layout import segment_softmax, tall_layout
from mmlayers.layers.synchronizer import (
    FeatureSynchronizer,
    PreparedValues,
    relative_image_positions,
)
from mmlayers.ops import multi_scale_deformable_attention

CFG = dict(dim=16, query_dim=12, value_dim=10, out_dim=14, heads=2, points=3,
           level_sizes=(4, 2), base_size=2, offset_init=1.5, max_images=6)


def official_sd(seed=0, dtype=torch.float64, **cfg):
    """Random weights in the official MMFS layout (with ignore-slot logit rows)."""
    c = {**CFG, **cfg}
    g = torch.Generator().manual_seed(seed)
    dq, dv, d, do = c["query_dim"], c["value_dim"], c["dim"], c["out_dim"]
    h, p, nl = c["heads"], c["points"], len(c["level_sizes"])

    def r(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return {
        "dynamic_offset_mask.weight": r(dq, dq), "dynamic_offset_mask.bias": r(dq),
        "sampling_offsets.weight": r(h * p * 2, dq, scale=0.2),
        "sampling_offsets.bias": r(h * p * 2, scale=1.0),
        "attention_weights.weight": r(h * nl * (p + 1), dq),
        "attention_weights.bias": r(h * nl * (p + 1)),
        "value_proj.weight": r(d, dv), "value_proj.bias": r(d),
        "output_proj.weight": r(do, d), "output_proj.bias": r(do),
        "query_relpos.weight": r(c["max_images"], dq),
        "ignore_token": torch.zeros(1, 1, 1, d, dtype=dtype),
    }


def loop_relative_positions(vis):
    """Relative image index by a plain loop (no mmlayers code): walking back from the last
    image, the visible ones get 1, 2, …; invisible ones 0."""
    out = torch.zeros(vis.shape, dtype=torch.long)
    for idx in torch.cartesian_prod(*[torch.arange(k) for k in vis.shape[:-1]]).reshape(
            -1, vis.dim() - 1).tolist():
        r = 0
        for k in reversed(range(vis.shape[-1])):
            if vis[tuple(idx) + (k,)]:
                r += 1
                out[tuple(idx) + (k,)] = r
    return out


def official_forward(sd, query, features, visibility, ref=None, **cfg):
    """The official semantics, per image: repeat the query for every image, dq×dq Linear,
    add the relpos row, offsets/logits per image, −10000 on invisible images, ignore slots
    of logit −log(m·l) and zero value, one joint softmax, sample every image."""
    c = {**CFG, **cfg}
    h, p, sizes, base = c["heads"], c["points"], c["level_sizes"], c["base_size"]
    nl = len(sizes)
    b, n, _ = query.shape
    m = features.shape[1]
    vis = visibility if visibility.dim() == 3 else visibility[:, None].expand(b, n, m)
    relpos = loop_relative_positions(vis)  # (b, n, m)
    value = F.linear(features, sd["value_proj.weight"], sd["value_proj.bias"])
    value = rearrange(value, "b m s (h dh) -> b (m s) h dh", h=h)
    q = query[:, None].expand(b, m, n, query.shape[-1])
    q = F.linear(q, sd["dynamic_offset_mask.weight"], sd["dynamic_offset_mask.bias"])
    q = q + sd["query_relpos.weight"][relpos.transpose(1, 2)]
    off = F.linear(q, sd["sampling_offsets.weight"], sd["sampling_offsets.bias"])
    off = rearrange(off, "b m n (h p xy) -> b n h m p xy", h=h, p=p)
    if ref is None:
        ref = torch.full((b, n, 2), 0.5, dtype=query.dtype)
    locs = [ref[:, :, None, None, None] + off * (s / base) / s for s in sizes]
    loc = rearrange(torch.stack(locs, 4), "b n h m l p xy -> b n h (m l) p xy")
    logit = F.linear(q, sd["attention_weights.weight"], sd["attention_weights.bias"])
    logit = rearrange(logit, "b m n (h l p) -> b n h m l p", h=h, l=nl)
    logit = logit + (~vis).to(logit.dtype)[:, :, None, :, None, None] * -10000.0
    logit[..., -1] = -math.log(m * nl)
    w = rearrange(logit, "b n h m l p -> b n h (m l p)").softmax(-1)
    w = rearrange(w, "b n h (m l p) -> b n h (m l) p", m=m, l=nl)
    out = multi_scale_deformable_attention(value, [(s, s) for s in sizes] * m, None, loc,
                                           w[..., :-1], backend="reference")
    ignore = sd["ignore_token"].reshape(h, -1)  # zero value of every ignore slot
    out = out + rearrange(w[..., -1].sum(-1)[..., None] * ignore, "b n h dh -> b n (h dh)")
    return F.linear(out, sd["output_proj.weight"], sd["output_proj.bias"])


def make(seed=0, dtype=torch.float64, **cfg):
    torch.manual_seed(seed)
    layer = FeatureSynchronizer(**{**CFG, **cfg}, dtype=dtype)
    sd = official_sd(seed, dtype, **cfg)
    layer.load_official_state_dict(sd)
    return layer, sd


def inputs(b=2, n=7, m=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = sum(x * x for x in CFG["level_sizes"])
    query = torch.randn(b, n, CFG["query_dim"], generator=g).to(dtype)
    feats = torch.randn(b, m, s, CFG["value_dim"], generator=g).to(dtype)
    vis = torch.rand(b, n, m, generator=g) > 0.4
    vis[0, 0] = False  # one query sees nothing
    vis[1, 1] = True
    return query, feats, vis


@pytest.mark.parametrize("chunk", [64, 3, 1])
def test_hoisted_matches_official_fp64(chunk):
    layer, sd = make()
    layer.query_chunk = chunk
    query, feats, vis = inputs()
    ref = torch.rand(2, 7, 2, dtype=torch.float64)
    for v, r in ((vis, None), (vis, ref), (vis[:, 3], None), (None, ref)):
        full = torch.ones(2, 7, 3, dtype=torch.bool) if v is None else v
        want = official_forward(sd, query, feats, full, r)
        got = layer(query, feats, v, reference_points=r)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        got = layer(query, values=layer.project_values(feats), visibility=v,
                    reference_points=r)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_backends_and_offsets_leaving_image(backend):
    # large offsets: many samples leave their image and must read zeros, not the neighbour
    layer, sd = make(offset_init=0.0)
    sd["sampling_offsets.bias"] = sd["sampling_offsets.bias"] * 4
    layer.load_official_state_dict(sd)
    layer.backend = backend
    query, feats, vis = inputs(seed=3)
    torch.testing.assert_close(layer(query, feats, vis), official_forward(sd, query, feats, vis),
                               rtol=1e-10, atol=1e-10)


def test_invisible_images_do_not_matter():
    layer, _ = make()
    query, feats, vis = inputs()
    out = layer(query, feats, vis)
    vis_img = vis.any(1)  # images some query of the row sees
    for b, k in zip(*torch.nonzero(~vis.all(1), as_tuple=True), strict=True):
        other = feats.clone()
        other[b, k] = torch.randn_like(other[b, k]) * 100
        out2 = layer(query, other, vis)
        rows = ~vis[b, :, k]
        torch.testing.assert_close(out2[b, rows], out[b, rows], rtol=0, atol=0)
        if vis_img[b, k]:
            assert not torch.allclose(out2[b, ~rows], out[b, ~rows])


def test_query_that_sees_nothing_returns_ignore_output():
    layer, _ = make()
    query, feats, _ = inputs()
    vis = torch.zeros(2, 7, 3, dtype=torch.bool)
    want = layer.output_proj(torch.zeros(2, 7, CFG["dim"], dtype=torch.float64))
    torch.testing.assert_close(layer(query, feats, vis), want, rtol=0, atol=0)
    vis[0, 2, 1] = True
    out = layer(query, feats, vis)
    torch.testing.assert_close(out[0, 3:], want[0, 3:], rtol=0, atol=0)
    assert not torch.allclose(out[0, 2], want[0, 2])


def test_no_images_is_a_query_that_sees_nothing():
    # a document with no image yet must give what its tokens get once images follow them
    # (the synchronizer is causal): output_proj(0), with gradients to output_proj only
    layer, _ = make()
    query, feats, _ = inputs()
    empty = feats[:, :0].clone().requires_grad_(True)
    out = layer(query, empty, torch.zeros(2, 7, 0, dtype=torch.bool))
    want = layer.output_proj(torch.zeros(2, 7, CFG["dim"], dtype=torch.float64))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(layer(query, empty), want, rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(layer.output_proj.bias.grad,
                               torch.full_like(layer.output_proj.bias, 2.0 * 7))
    empty_values = torch.zeros(2, 0, 20, 4, dtype=torch.float64, requires_grad=True)
    tall = tall_layout(empty_values, (4, 2), heads=2)
    assert tall.shape == (2, 2, 0, 2)
    tall.sum().backward()   # the layout's backward runs for zero images too
    assert empty_values.grad.shape == (2, 0, 20, 4)


def test_relative_positions_hand_made():
    vis = torch.tensor([[[1, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]]]).bool()
    assert relative_image_positions(vis).tolist() == [
        [[3, 2, 1, 0], [3, 0, 2, 1], [0, 0, 0, 0], [0, 1, 0, 0]]]
    assert loop_relative_positions(vis).tolist() == relative_image_positions(vis).tolist()


def test_relpos_table_is_used_per_image():
    # only the relpos row differs between the two images' queries: changing row 2 changes
    # queries that see two images and leaves queries that see one untouched
    layer, _ = make()
    query, feats, _ = inputs(m=2)
    vis = torch.tensor([[True, False], [True, True]])
    out = layer(query, feats, vis)
    with torch.no_grad():
        layer.query_relpos.weight[2] += 1.0
    out2 = layer(query, feats, vis)
    torch.testing.assert_close(out2[0], out[0], rtol=0, atol=0)
    assert not torch.allclose(out2[1], out[1])


def test_init_matches_official():
    torch.manual_seed(0)
    layer = FeatureSynchronizer(**CFG)
    assert torch.all(layer.sampling_offsets.weight == 0)
    assert layer.sampling_offsets.bias.abs().max() <= CFG["offset_init"]
    assert layer.sampling_offsets.bias.abs().max() > 0.5 * CFG["offset_init"]
    for name in ("attention_weights", "value_proj", "output_proj", "query_proj"):
        assert torch.all(getattr(layer, name).bias == 0), name
    bound = math.sqrt(6 / (CFG["value_dim"] + CFG["dim"]))
    assert layer.value_proj.weight.abs().max() <= bound
    assert 0.01 < layer.query_relpos.weight.std() < 0.03


@pytest.mark.parametrize("chunk,n", [(128, 3), (1, 3), (None, 9)])
def test_gradcheck_fp64(chunk, n):
    # n=9 > h·p·2 + h·l·p = 8 offset and logit rows: the re-associated projection order
    cfg = dict(dim=4, query_dim=3, value_dim=2, out_dim=3, heads=2, points=1,
               level_sizes=(2, 1), base_size=2, max_images=4, query_chunk=chunk)
    layer = FeatureSynchronizer(**cfg, dtype=torch.float64)
    with torch.no_grad():
        layer.query_proj.bias.normal_()
        layer.sampling_offsets.weight.normal_(std=0.3)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, n, 3, generator=g, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(1, 2, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    vis = torch.tensor([[True, False], [True, True], [False, True]]).repeat(n // 3, 1)[None]
    names = ("query_proj.weight", "query_proj.bias", "sampling_offsets.weight",
             "attention_weights.weight")

    def fn(q, f, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (q, f, vis))

    params = dict(layer.named_parameters())
    inputs = (query, feats, *(params[k].detach().clone().requires_grad_() for k in names))
    assert torch.autograd.gradcheck(fn, inputs)


def test_many_queries_reassociated_projection_matches_official():
    layer, sd = make()
    query, feats, vis = inputs(n=20, seed=5)  # b·n = 40 > 24 offset and logit rows
    ref = torch.rand(2, 20, 2, dtype=torch.float64)
    want = official_forward(sd, query, feats, vis, ref)
    torch.testing.assert_close(layer(query, feats, vis, reference_points=ref), want,
                               rtol=1e-10, atol=1e-10)
    half = torch.cat([layer(query[:, i:i + 5], feats, vis[:, i:i + 5],  # b·n = 10: W_q q first
                            reference_points=ref[:, i:i + 5]) for i in range(0, 20, 5)], 1)
    torch.testing.assert_close(half, want, rtol=1e-10, atol=1e-10)


def test_segment_softmax_is_softmax_with_a_null_entry():
    g = torch.Generator().manual_seed(0)
    logit = torch.randn(7, 2, 3, generator=g, dtype=torch.float64) * 30
    seg = torch.tensor([0, 0, 2, 2, 2, 3, 3])
    got = segment_softmax(logit, seg, 5)
    for s in range(5):
        rows = logit[seg == s]  # (r, h, k)
        flat = torch.cat((rows.transpose(0, 1).reshape(2, -1), torch.zeros(2, 1,
                          dtype=logit.dtype)), -1).softmax(-1)[:, :-1]
        torch.testing.assert_close(got[seg == s].transpose(0, 1).reshape(2, -1), flat,
                                   rtol=1e-14, atol=1e-300)


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    layer = FeatureSynchronizer(**CFG)
    query, feats, vis = (t.float() if t.is_floating_point() else t for t in inputs())
    want = layer(query, feats, vis)
    got = layer.to(torch.bfloat16)(query.bfloat16(), feats.bfloat16(), vis)
    assert got.dtype == torch.bfloat16
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 2e-2, rel


def test_official_checkpoint_keys_round_trip_errors():
    layer, sd = make()
    bad = dict(sd)
    bad["ignore_token"] = torch.ones_like(sd["ignore_token"])
    with pytest.raises(ValueError, match="ignore_token"):
        layer.load_official_state_dict(bad)
    with pytest.raises(ValueError, match="lacks"):
        layer.load_official_state_dict({k: v for k, v in sd.items() if "relpos" not in k})
    prefixed = {"model.x." + k: v for k, v in sd.items()}
    layer.load_official_state_dict(prefixed, prefix="model.x.")
    with pytest.raises(ValueError, match="attention_weights"):
        FeatureSynchronizer(**{**CFG, "points": 2}).load_official_state_dict(sd)


def test_bad_input_errors():
    layer, _ = make()
    query, feats, vis = inputs()
    with pytest.raises(ValueError, match="max_images=6"):
        layer(query, feats.repeat(1, 2, 1, 1), None)
    with pytest.raises(ValueError, match=r"visibility must have shape"):
        layer(query, feats, vis[:, :3])
    with pytest.raises(ValueError, match=r"s=20"):
        layer(query, feats[:, :, :-1])
    with pytest.raises(ValueError, match=r"query_dim=12"):
        layer(query[..., :-1], feats, vis)
    with pytest.raises(ValueError, match="exactly one"):
        layer(query, feats, vis, values=layer.project_values(feats))
    with pytest.raises(ValueError, match="reference_points"):
        layer(query, feats, vis, reference_points=torch.rand(2, 7, 3))
    with pytest.raises(ValueError, match="divisible"):
        FeatureSynchronizer(dim=10, query_dim=4, value_dim=4, heads=3)


# ------------------------------------------------------------ prepared values, decode path
def _count_calls(monkeypatch, name):
    import mmlayers.layers.synchronizer as mod

    calls, fn = [], getattr(mod, name)

    def wrapper(*args, **kwargs):
        calls.append(args[-1].shape if name == "multi_scale_deformable_attention" else 1)
        return fn(*args, **kwargs)

    monkeypatch.setattr(mod, name, wrapper)
    return calls


def test_tall_layout_by_hand_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    b, m, sizes, h = 2, 3, (3, 2), 2
    values = torch.randn(b, m, 13, 4, generator=g, dtype=torch.float64)
    got = tall_layout(values, sizes, h)  # (b, h, S, dh)
    assert got.shape == (b, h, m * 4 * 3 + m * 3 * 2, 2)
    start = row = 0
    for size in sizes:
        for k in range(m):
            img = values[:, k, start:start + size * size].view(b, size, size, h, 2)
            for i in range(size + 1):
                want = img[:, i] if i < size else torch.zeros_like(img[:, 0])
                seg = got[:, :, row:row + size].permute(0, 2, 1, 3)  # (b, W, h, dh)
                assert torch.equal(seg, want)
                row += size
        start += size * size
    assert row == got.shape[2]
    small = torch.randn(1, 2, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: tall_layout(v, (2, 1), 2), (small,))


def test_prepared_values_equal_raw_path_exactly(monkeypatch):
    layer, sd = make()
    query, feats, vis = inputs()
    ref = torch.rand(2, 7, 2, dtype=torch.float64)
    raw = layer(query, feats, vis, reference_points=ref)
    layouts = _count_calls(monkeypatch, "tall_layout")
    prepared = layer.prepare_values(feats)
    assert isinstance(prepared, PreparedValues) and len(layouts) == 1
    assert (prepared.batch, prepared.images, prepared.dim) == (2, 3, CFG["dim"])
    for _ in range(2):  # reused, never laid out again
        got = layer(query, visibility=vis, values=prepared, reference_points=ref)
        assert torch.equal(got, raw)
    assert len(layouts) == 1
    torch.testing.assert_close(raw, official_forward(sd, query, feats, vis, ref),
                               rtol=1e-10, atol=1e-10)
    # from projected values, and batch rows picked from a prepared batch
    assert torch.equal(layer(query, values=layer.prepare_values(
        values=layer.project_values(feats)), visibility=vis, reference_points=ref), raw)
    idx = torch.tensor([1, 1, 0])
    picked = prepared.index_select(idx)
    assert torch.equal(picked.tall, layer.prepare_values(feats[idx]).tall)
    assert torch.equal(layer(query[idx], values=picked, visibility=vis[idx]),
                       layer(query[idx], feats[idx], vis[idx]))


def test_prepared_values_carry_gradients_like_raw_path():
    layer, _ = make()
    query, feats, vis = inputs()
    grads = []
    for prepared in (False, True):
        f = feats.clone().requires_grad_()
        q = query.clone().requires_grad_()
        layer.zero_grad()
        vals = layer.prepare_values(f) if prepared else None
        out = layer(q, None if prepared else f, vis, values=vals)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        grads.append([f.grad, q.grad] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert grads[0][0].abs().sum() > 0


def test_decode_step_single_op_call_matches_full_sequence(monkeypatch):
    # a decoding step: one query per row, its visibility row; equals the matching row of the
    # full-sequence call, with one small op call over only the images it sees
    layer, sd = make()
    query, feats, vis = inputs()
    full = layer(query, feats, vis)
    prepared = layer.prepare_values(feats)
    calls = _count_calls(monkeypatch, "multi_scale_deformable_attention")
    layouts = _count_calls(monkeypatch, "tall_layout")
    for t in range(query.shape[1]):
        step = layer(query[:, t:t + 1], visibility=vis[:, t:t + 1], values=prepared)
        torch.testing.assert_close(step, full[:, t:t + 1], rtol=1e-12, atol=1e-12)
        want = official_forward(sd, query[:, t:t + 1], feats, vis[:, t:t + 1])
        torch.testing.assert_close(step, want, rtol=1e-10, atol=1e-10)
    assert not layouts
    # one call per step that sees any image, of (b, n', h, l, p, 2) with n' = the images the
    # step's query sees in its fullest row: invisible images are not sampled
    seen = [int(x) for x in vis.sum(-1).amax(0)]
    assert 0 in vis.sum(-1)[0].tolist() and min(seen) < vis.shape[-1]
    assert [c[:2] for c in calls] == [(2, x) for x in seen if x]


def test_one_op_call_for_all_queries_by_default(monkeypatch):
    layer, _ = make()
    query, feats, vis = inputs()
    calls = _count_calls(monkeypatch, "multi_scale_deformable_attention")
    layer(query, feats, vis)
    assert len(calls) == 1
    # the call reads exactly the visible (query, image) pairs of the fullest row
    assert calls[0][:2] == (2, int(vis.sum((1, 2)).max()))
    layer.query_chunk = 3
    layer(query, feats, vis)
    assert len(calls) == 1 + 3


def test_prepared_values_errors():
    layer, _ = make()
    query, feats, vis = inputs()
    other = FeatureSynchronizer(**{**CFG, "heads": 4}, dtype=torch.float64)
    with pytest.raises(ValueError, match="heads=4"):
        layer(query, values=other.prepare_values(feats), visibility=vis)
    with pytest.raises(ValueError, match="image batch 1"):
        layer(query, values=layer.prepare_values(feats[:1]), visibility=vis)
    with pytest.raises(ValueError, match="exactly one"):
        layer.prepare_values(feats, values=layer.project_values(feats))
    with pytest.raises(ValueError, match="max_images=6"):
        layer.prepare_values(feats.repeat(1, 2, 1, 1))
