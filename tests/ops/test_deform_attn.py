"""multi_scale_deformable_attention: backends against the grid_sample oracle, a
hand-computed case, transformers' implementation, gradients and input errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmlayers.ops import (
    DeformAttnBackend,
    auto_backend,
    available_backends,
    deform_attn,
    explain_backends,
    multi_scale_deformable_attention,
)
from mmlayers.ops import _torch as torch_backend
from mmlayers.ops.deform_attn import _validate

CPU_BACKENDS = ["reference", "torch"]

# (name, level shapes, dh, location spread): non-square maps, a 1×1 map, dh not a power
# of two, and locations well outside [0, 1] so that samples straddle and leave the border.
CASES = [
    ("nonsquare", [(5, 7), (3, 2)], 5, (0.0, 1.0)),
    ("one_by_one", [(1, 1), (2, 3)], 3, (-0.3, 1.3)),
    ("outside", [(4, 4), (2, 2), (1, 1)], 6, (-0.6, 1.6)),
]


def make_inputs(shapes, dh, spread, *, b=2, n=4, h=2, p=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(hh * ww for hh, ww in shapes)
    value = torch.randn(b, s, h, dh, generator=g, dtype=dtype)
    lo, hi = spread
    loc = torch.rand(b, n, h, len(shapes), p, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    attn = torch.rand(b, n, h, len(shapes), p, generator=g, dtype=dtype)
    return value, loc, attn


def hand_bilinear(value, shapes, loc, attn):
    """Independent oracle: explicit loops over samples and the four corners."""
    b, _, h, dh = value.shape
    n, p = loc.shape[1], loc.shape[4]
    out = torch.zeros(b, n, h, dh, dtype=torch.float64)
    starts = [0]
    for hh, ww in shapes[:-1]:
        starts.append(starts[-1] + hh * ww)
    for bi in range(b):
        for qi in range(n):
            for hi in range(h):
                for li, (hh, ww) in enumerate(shapes):
                    for pi in range(p):
                        x = loc[bi, qi, hi, li, pi, 0].item() * ww - 0.5
                        y = loc[bi, qi, hi, li, pi, 1].item() * hh - 0.5
                        x0, y0 = int(torch.tensor(x).floor()), int(torch.tensor(y).floor())
                        for xx in (x0, x0 + 1):
                            for yy in (y0, y0 + 1):
                                if 0 <= xx < ww and 0 <= yy < hh:
                                    wgt = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                    row = value[bi, starts[li] + yy * ww + xx, hi].double()
                                    out[bi, qi, hi] += attn[bi, qi, hi, li, pi].item() * wgt * row
    return out.reshape(b, n, h * dh)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_hand_written_bilinear(backend, case):
    _, shapes, dh, spread = case
    value, loc, attn = make_inputs(shapes, dh, spread, n=3)
    out = multi_scale_deformable_attention(value, shapes, None, loc, attn, backend=backend)
    torch.testing.assert_close(out, hand_bilinear(value, shapes, loc, attn), rtol=1e-12,
                               atol=1e-12)


def test_hand_computed_2x2():
    # 2×2 map with pixel values 1, 2, 3, 4 (row-major), one head of width 1.
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    cases = {
        (0.5, 0.5): 2.5,      # the centre averages the four pixels
        (0.25, 0.25): 1.0,    # the centre of pixel (0, 0)
        (0.75, 0.25): 2.0,    # the centre of pixel (0, 1)
        (0.0, 0.0): 0.25,     # the outer corner: a quarter of pixel (0, 0), rest is zero
        (1.5, 0.5): 0.0,      # fully outside
    }
    for backend in CPU_BACKENDS:
        for (x, y), expected in cases.items():
            loc = torch.tensor([x, y]).view(1, 1, 1, 1, 1, 2)
            attn = torch.ones(1, 1, 1, 1, 1)
            out = multi_scale_deformable_attention(value, [(2, 2)], [0], loc, attn,
                                                   backend=backend)
            assert out.item() == pytest.approx(expected), (backend, x, y)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_equals_reference(case):
    _, shapes, dh, spread = case
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        value, loc, attn = make_inputs(shapes, dh, spread, n=9, dtype=dtype)
        ref = multi_scale_deformable_attention(value, shapes, None, loc, attn,
                                               backend="reference")
        out = multi_scale_deformable_attention(value, shapes, None, loc, attn, backend="torch")
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(low):
    shapes = [(8, 6), (4, 3), (2, 2)]
    value, loc, attn = make_inputs(shapes, 16, (0.0, 1.0), n=32, h=4, p=4,
                                   dtype=torch.float32)
    attn = attn.softmax(-1)
    ref = multi_scale_deformable_attention(value, shapes, None, loc, attn, backend="reference")
    for backend in CPU_BACKENDS:
        out = multi_scale_deformable_attention(value.to(low), shapes, None, loc, attn,
                                               backend=backend)
        assert out.dtype == low
        rel = (out.float() - ref).norm() / ref.norm()
        assert rel < 1e-2, (backend, rel.item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradcheck(backend, case):
    _, shapes, dh, spread = case
    value, loc, attn = make_inputs(shapes, dh, spread, n=3, p=2)
    # Random locations fall on a pixel-centre line (a kink of bilinear sampling) with
    # probability zero, so finite differences are valid.
    args = [t.clone().requires_grad_() for t in (value, loc, attn)]

    def fn(v, lc, a):
        return multi_scale_deformable_attention(v, shapes, None, lc, a, backend=backend)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_chunked_torch_backend_gradcheck():
    """Tiny chunks force several query chunks and activation checkpointing."""
    shapes = [(3, 4), (1, 1)]
    value, loc, attn = make_inputs(shapes, 3, (-0.2, 1.2), n=5, p=2)
    args = [t.clone().requires_grad_() for t in (value, loc, attn)]

    def fn(v, lc, a):
        return torch_backend.torch_deformable_attention(_validate(v, shapes, None, lc, a),
                                                        chunk_bytes=1)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)
    out = fn(*args)
    ref = multi_scale_deformable_attention(*args[:1], shapes, None, *args[1:],
                                           backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_gradients_match_reference_fp32():
    shapes = [(6, 5), (3, 3)]
    value, loc, attn = make_inputs(shapes, 8, (-0.1, 1.1), n=16, h=4, p=4,
                                   dtype=torch.float32)
    grads = {}
    for backend in CPU_BACKENDS:
        args = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = multi_scale_deformable_attention(args[0], shapes, None, args[1], args[2],
                                               backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[backend] = [a.grad for a in args]
    for g_ref, g in zip(grads["reference"], grads["torch"], strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_agrees_with_transformers_implementation():
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        MultiScaleDeformableAttention as HFOp,
    )

    shapes = [(7, 9), (4, 5), (2, 3), (1, 1)]
    value, loc, attn = make_inputs(shapes, 8, (-0.2, 1.2), n=20, h=4, p=4,
                                   dtype=torch.float32)
    hf = HFOp()(value, torch.tensor(shapes), shapes, None, loc, attn, 64)
    for backend in CPU_BACKENDS:
        out = multi_scale_deformable_attention(value, shapes, None, loc, attn, backend=backend)
        torch.testing.assert_close(out, hf, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    levels=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3),
    b=st.integers(1, 2), n=st.integers(1, 6), h=st.integers(1, 3), dh=st.integers(1, 5),
    p=st.integers(1, 3), seed=st.integers(0, 2**16),
)
def test_property_torch_equals_reference(levels, b, n, h, dh, p, seed):
    value, loc, attn = make_inputs(levels, dh, (-0.5, 1.5), b=b, n=n, h=h, p=p, seed=seed)
    ref = multi_scale_deformable_attention(value, levels, None, loc, attn, backend="reference")
    out = multi_scale_deformable_attention(value, levels, None, loc, attn, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)


def test_spatial_shapes_as_tensor_and_level_start_index():
    shapes = [(3, 4), (2, 2)]
    value, loc, attn = make_inputs(shapes, 4, (0, 1))
    a = multi_scale_deformable_attention(value, torch.tensor(shapes), torch.tensor([0, 12]),
                                         loc, attn)
    b = multi_scale_deformable_attention(value, shapes, None, loc, attn)
    torch.testing.assert_close(a, b)


def test_torch_backend_under_torch_compile():
    shapes = [(4, 5), (2, 3)]
    value, loc, attn = make_inputs(shapes, 4, (-0.1, 1.1), n=6, dtype=torch.float32)

    def fn(v, lc, a):
        return multi_scale_deformable_attention(v, shapes, None, lc, a, backend="torch")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    args_c = [t.clone().requires_grad_() for t in (value, loc, attn)]
    args_e = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out_c, out_e = compiled(*args_c), fn(*args_e)
    torch.testing.assert_close(out_c, out_e)
    out_c.square().sum().backward()
    out_e.square().sum().backward()
    for gc, ge in zip(args_c, args_e, strict=True):
        torch.testing.assert_close(gc.grad, ge.grad)


def test_backends_listed_and_explained():
    names = available_backends()
    assert names.index("torch") < names.index("reference")
    value, loc, attn = make_inputs([(2, 2)], 2, (0, 1))
    reasons = explain_backends(value, [(2, 2)], None, loc, attn)
    assert reasons["torch"] == [] and reasons["reference"] == []


def test_forcing_a_backend_that_cannot_run_lists_its_reasons(monkeypatch):
    fussy = DeformAttnBackend(name="fussy", run=lambda inputs: None,
                              not_supported_reasons=lambda inputs: ["needs a quantum GPU"])
    monkeypatch.setitem(deform_attn._REGISTRY, "fussy", fussy)
    value, loc, attn = make_inputs([(2, 2)], 2, (0, 1))
    with pytest.raises(ValueError, match="fussy.*needs a quantum GPU"):
        multi_scale_deformable_attention(value, [(2, 2)], None, loc, attn, backend="fussy")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        multi_scale_deformable_attention(value, [(2, 2)], None, loc, attn, backend="nope")


def test_auto_error_lists_every_backend(monkeypatch):
    for name in list(deform_attn._REGISTRY):
        be = deform_attn._REGISTRY[name]
        monkeypatch.setitem(deform_attn._REGISTRY, name, DeformAttnBackend(
            name=name, run=be.run, not_supported_reasons=lambda i, n=name: [f"{n} says no"],
            priority=be.priority))
    value, loc, attn = make_inputs([(2, 2)], 2, (0, 1))
    with pytest.raises(ValueError, match="(?s)no deformable-attention backend.*reference says no"):
        multi_scale_deformable_attention(value, [(2, 2)], None, loc, attn)


def test_bad_inputs_raise_clear_errors():
    shapes = [(2, 2), (1, 1)]
    value, loc, attn = make_inputs(shapes, 2, (0, 1))
    op = multi_scale_deformable_attention
    with pytest.raises(ValueError, match=r"cover Σ H·W = 8 tokens but value has s = 5"):
        op(value, [(2, 2), (2, 2)], None, loc, attn)
    with pytest.raises(ValueError, match=r"sampling_locations has shape .* expected .*l=2"):
        op(value, shapes, None, loc[:, :, :, :1], attn)
    with pytest.raises(ValueError, match=r"attention_weights must have shape"):
        op(value, shapes, None, loc, attn[..., :1])
    with pytest.raises(TypeError, match=r"spatial_shapes must hold integers"):
        op(value, torch.tensor([[2.0, 2.0], [1.0, 1.0]]), None, loc, attn)
    with pytest.raises(TypeError, match=r"spatial_shapes\[0\].*floats"):
        op(value, [(2.0, 2.0), (1, 1)], None, loc, attn)
    with pytest.raises(ValueError, match=r"value must have shape \(b, s, h, dh\)"):
        op(value[0], shapes, None, loc, attn)
    with pytest.raises(ValueError, match=r"level_start_index \[0, 3\] does not match"):
        op(value, shapes, [0, 3], loc, attn)
    with pytest.raises(TypeError, match=r"attention_weights must be a floating-point"):
        op(value, shapes, None, loc, attn.long())
    with pytest.raises(ValueError, match=r"one device"):
        op(value, shapes, None, loc.to("meta"), attn)
    with pytest.raises(ValueError, match=r"H and W must be >= 1"):
        op(value, [(0, 2), (5, 1)], None, loc, attn)


def test_out_of_range_locations_read_zero_and_are_allowed():
    value, loc, attn = make_inputs([(3, 3)], 2, (0, 1), n=2)
    far = torch.full_like(loc, 1e9)
    for backend in CPU_BACKENDS:
        out = multi_scale_deformable_attention(value, [(3, 3)], None, far, attn,
                                               backend=backend)
        assert torch.count_nonzero(out) == 0


def test_auto_skips_backends_outside_their_auto_devices(monkeypatch):
    calls = []
    gpu_only = DeformAttnBackend(name="gpu_only", run=lambda inputs: calls.append(1),
                                 not_supported_reasons=lambda inputs: [], priority=100,
                                 auto_devices=("cuda",))
    monkeypatch.setitem(deform_attn._REGISTRY, "gpu_only", gpu_only)
    value, loc, attn = make_inputs([(2, 2)], 2, (0, 1))
    out = multi_scale_deformable_attention(value, [(2, 2)], None, loc, attn)
    ref = multi_scale_deformable_attention(value, [(2, 2)], None, loc, attn, backend="reference")
    torch.testing.assert_close(out, ref)
    assert calls == []
    multi_scale_deformable_attention(value, [(2, 2)], None, loc, attn, backend="gpu_only")
    assert calls == [1]


def _inputs(dh: int, grad: bool):
    g = torch.Generator().manual_seed(0)
    value = torch.randn(2, 4 * 4 + 2 * 2, 2, dh, generator=g).requires_grad_(grad)
    loc = torch.rand(2, 3, 2, 2, 2, 2, generator=g)
    attn = torch.rand(2, 3, 2, 2, 2, generator=g)
    return value, [(4, 4), (2, 2)], None, loc, attn


def test_auto_leaves_narrow_heads_with_gradients_to_the_reference_on_cpu():
    """On the CPU, forward+backward at head width <= CPU_REFERENCE_MAX_HEAD_DIM runs the
    reference (measured faster there); without gradients or at wider heads: torch."""
    narrow = torch_backend.CPU_REFERENCE_MAX_HEAD_DIM
    assert auto_backend(*_inputs(narrow, grad=True)) == "reference"
    assert auto_backend(*_inputs(narrow, grad=False)) == "torch"
    assert auto_backend(*_inputs(2 * narrow, grad=True)) == "torch"
    with torch.no_grad():
        assert auto_backend(*_inputs(narrow, grad=True)) == "torch"
    # "auto" runs what auto_backend names (same numbers and gradients as the reference),
    # and the torch backend still runs when forced by name
    v, shapes, _, loc, attn = _inputs(narrow, grad=True)
    out = multi_scale_deformable_attention(v, shapes, None, loc, attn)
    (gv,) = torch.autograd.grad(out.square().sum(), v)
    v2 = v.detach().clone().requires_grad_()
    ref = multi_scale_deformable_attention(v2, shapes, None, loc, attn, backend="reference")
    (gr,) = torch.autograd.grad(ref.square().sum(), v2)
    assert torch.equal(out, ref) and torch.equal(gv, gr)
    forced = multi_scale_deformable_attention(v, shapes, None, loc, attn, backend="torch")
    torch.testing.assert_close(forced, ref, atol=1e-5, rtol=1e-5)
