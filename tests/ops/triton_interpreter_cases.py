"""Interpreter cases of the ``"triton"`` backend, checked against the grid_sample reference.

Not collected as tests by a plain ``pytest`` run (the name does not start with ``test_``):
``tests/ops/test_triton.py::test_interpreter_cases`` runs this file in a subprocess with
``TRITON_INTERPRET=1`` set from the start, because triton fixes interpreter vs compiler
mode when ``triton.language`` is first imported. Run it directly with::

    TRITON_INTERPRET=1 .venv/bin/pytest tests/ops/triton_interpreter_cases.py
"""

from __future__ import annotations

import pytest
import torch

from mmlayers.ops import multi_scale_deformable_attention
from mmlayers.ops._triton import (
    KERNEL_CONFIG,
    _device_reasons,
    interpreter_enabled,
    triton_deformable_attention,
)


@pytest.fixture(autouse=True)
def _require_interpreter():
    # A failure, not a skip: these cases must run (pytest --doctest-modules imports this
    # file in the parent process too, so the check cannot live at import time).
    if not interpreter_enabled():
        pytest.fail("run with TRITON_INTERPRET=1 set before triton is imported; "
                    "see this file's docstring")
    why = _device_reasons(torch.device("cpu"))
    assert why == [], why


def _inputs(shapes, *, b=1, h=2, dh=5, n=6, p=3, dtype=torch.float64, lo=-0.3, hi=1.3,
            seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(hh * ww for hh, ww in shapes)
    value = torch.randn(b, s, h, dh, generator=g, dtype=torch.float64).to(dtype)
    loc = lo + (hi - lo) * torch.rand(b, n, h, len(shapes), p, 2, generator=g,
                                      dtype=torch.float64)
    attn = torch.rand(b, n, h, len(shapes), p, generator=g, dtype=torch.float64)
    grad = torch.randn(b, n, h * dh, generator=g, dtype=torch.float64)
    return value, loc, attn, grad


def _run_both(shapes, value, loc, attn, grad, *, backend_kw=None, ref_attn_mask=None):
    """Output and (value, loc, attn) gradients of triton and of the reference."""
    results = []
    for which in ("triton", "reference"):
        v, lo, a = (t.detach().clone().requires_grad_() for t in (value, loc, attn))
        if which == "triton" and backend_kw is not None:
            out = triton_deformable_attention(v, shapes, None, lo, a, **backend_kw)
        elif which == "triton":
            out = multi_scale_deformable_attention(v, shapes, None, lo, a, backend="triton")
        else:
            a_ref = a if ref_attn_mask is None else a * ref_attn_mask
            out = multi_scale_deformable_attention(v, shapes, None, lo, a_ref,
                                                   backend="reference")
        grads = torch.autograd.grad(out, (v, lo, a), grad.to(out.dtype))
        results.append((out, *grads))
    return results


def _assert_close(got, want, atol, rtol=0.0):
    names = ("out", "grad_value", "grad_loc", "grad_attn")
    for name, x, y in zip(names, got, want, strict=True):
        assert x.dtype == y.dtype, name
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m, k=name: f"{k}: {m}")


CASES = {
    # non-square maps, a 1x1 map, dh not a power of two, points far outside
    "mixed": dict(shapes=[(4, 6), (3, 2), (1, 1)], h=2, dh=5, n=7, p=3),
    "one_level_wide": dict(shapes=[(2, 9)], b=2, h=1, dh=3, n=5, p=1, lo=-1.0, hi=2.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_fp64(case):
    kw = dict(CASES[case])
    shapes = kw.pop("shapes")
    value, loc, attn, grad = _inputs(shapes, **kw)
    got, want = _run_both(shapes, value, loc, attn, grad)
    _assert_close(got, want, atol=1e-10)
    assert got[0].abs().max() > 0.1  # the comparison is not between zeros


def test_matches_reference_fp32_straddling_borders():
    shapes = [(3, 5), (2, 2), (1, 1)]
    value, loc, attn, grad = _inputs(shapes, b=2, h=2, dh=4, n=9, p=2, dtype=torch.float32)
    # Points half a pixel around every border: one or two corners fall outside.
    edge = torch.tensor([-0.04, 0.03, 0.97, 1.04, 0.5])
    loc = edge[torch.randint(0, 5, loc.shape, generator=torch.Generator().manual_seed(1))]
    loc = loc + 1e-3 * torch.rand(loc.shape, generator=torch.Generator().manual_seed(2))
    got, want = _run_both(shapes, value, loc.float(), attn.float(), grad.float())
    _assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_values_accumulate_in_fp32(dtype):
    shapes = [(4, 6), (1, 1)]
    value, loc, attn, grad = _inputs(shapes, h=2, dh=6, n=9, p=2)
    value, attn, grad = value.to(dtype), attn.to(dtype), grad.to(dtype)
    got = _run_both(shapes, value, loc.float(), attn, grad)[0]
    # Oracle: the reference in fp32 on exactly the same (rounded) inputs.
    want = _run_both(shapes, value.float(), loc.float(), attn.float(), grad.float())[1]
    assert [t.dtype for t in got] == [dtype, dtype, torch.float32, dtype]
    eps = torch.finfo(dtype).eps
    for x, y in zip(got, want, strict=True):
        # One rounding of the fp32 result (plus fp32 reordering), nothing accumulated.
        torch.testing.assert_close(x.float(), y, atol=1e-5, rtol=eps)


def test_identical_locations_block_reduction(monkeypatch):
    # The synchronizer at initialisation: every query samples the same points, so each
    # backward block takes the register-reduction path (one atomic row per corner).
    monkeypatch.setattr(KERNEL_CONFIG, "bwd_tile", 4096)  # blocks of 64 queries
    shapes = [(3, 4), (2, 2)]
    value, loc, attn, grad = _inputs(shapes, h=1, dh=4, n=70, p=2)
    loc = loc[:, :1].expand_as(loc).contiguous()
    loc[:, 64:] += 0.3  # the last block shares points too, a different set
    got, want = _run_both(shapes, value, loc, attn, grad)
    _assert_close(got, want, atol=1e-10)
    # Mixed block: one query moves, the block falls back to per-query atomics.
    loc[:, 5] = 0.2
    got, want = _run_both(shapes, value, loc, attn, grad)
    _assert_close(got, want, atol=1e-10)


def test_visibility_masks_and_skips_images(monkeypatch):
    monkeypatch.setattr(KERNEL_CONFIG, "fwd_tile", 64)  # blocks of 4 queries
    monkeypatch.setattr(KERNEL_CONFIG, "bwd_tile", 64)
    shapes = [(3, 4), (2, 2)] * 3  # m = 3 images of 2 levels
    value, loc, attn, grad = _inputs(shapes, b=2, h=2, dh=3, n=10, p=2)
    vis = torch.rand(2, 10, 3, generator=torch.Generator().manual_seed(3)) > 0.4
    vis[0, :4, 1] = False  # a whole query block never sees image 1: skipped
    vis[1, :, 2] = False
    mask = vis[:, :, None, :, None, None].expand(2, 10, 2, 3, 2, 1).reshape(2, 10, 2, 6, 1)
    got, want = _run_both(shapes, value, loc, attn, grad,
                          backend_kw=dict(visibility=vis), ref_attn_mask=mask.double())
    _assert_close(got, want, atol=1e-10)
    assert (got[3][~mask.expand_as(attn)] == 0).all()


def test_gradcheck_fp64():
    shapes = [(2, 3), (1, 1)]
    value, loc, attn, _ = _inputs(shapes, h=1, dh=2, n=2, p=1, lo=0.05, hi=0.95)
    args = [t.requires_grad_() for t in (value, loc, attn)]
    fn = lambda v, lo, a: multi_scale_deformable_attention(v, shapes, None, lo, a,  # noqa: E731
                                                          backend="triton")
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


def test_torch_compile_fullgraph():
    shapes = [(3, 4), (1, 1)]
    value, loc, attn, grad = _inputs(shapes, h=2, dh=4, n=3, p=2, dtype=torch.float32)

    def fn(v, lo, a):
        return multi_scale_deformable_attention(v, shapes, None, lo, a, backend="triton") * 2

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    outs = []
    for f in (fn, compiled):
        v, lo, a = (t.clone().requires_grad_() for t in (value, loc, attn))
        out = f(v, lo, a)
        outs.append((out, *torch.autograd.grad(out, (v, lo, a), grad.float())))
    for x, y in zip(*outs, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_non_finite_locations_propagate_nan():
    shapes = [(2, 3)]
    value, loc, attn, grad = _inputs(shapes, h=1, dh=2, n=4, p=2, lo=0.1, hi=0.9)
    loc[0, 1, 0, 0, 1, 0] = float("nan")
    loc[0, 2, 0, 0, 0, 1] = float("inf")
    got, want = _run_both(shapes, value, loc, attn, grad)
    assert torch.isnan(want[0][0, 1:3]).all() and torch.isfinite(want[0][0, [0, 3]]).all()
    torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=0, equal_nan=True)
    finite = torch.isfinite(loc).all(-1)  # (b, n, h, l, p)
    assert torch.isnan(got[3][~finite]).all() and torch.isnan(got[2][~finite]).all()
    torch.testing.assert_close(got[3][finite], want[3][finite], atol=1e-10, rtol=0)
