"""The ``"triton"`` backend: registry behaviour, the offline GPU build, and (in a
subprocess) the interpreter cases against the grid_sample reference.

Triton decides between compiler and interpreter when ``triton.language`` is imported
(``test_interpret_flag_is_read_at_import_and_decoration`` pins that fact down), so the
kernels cannot be switched to the interpreter inside this process, which may already have
imported triton without it, and setting ``TRITON_INTERPRET`` in a conftest would make
``"auto"`` route every other CPU test through the slow interpreter. Instead
``test_interpreter_cases`` runs ``tests/ops/triton_interpreter_cases.py`` in a child
pytest with ``TRITON_INTERPRET=1``. The compiled GPU path cannot run here;
``test_kernels_compile_for_sm90`` builds both kernels to sm_90 cubins with the ptxas that
ships in the triton wheel.

Triton is installed in CI; there a missing triton is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmlayers.ops import explain_backends, multi_scale_deformable_attention

if os.environ.get("CI"):
    import triton  # noqa: F401  (must be present in CI)
else:
    pytest.importorskip("triton")

from mmlayers.ops._triton import triton_deformable_attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _inputs(shapes, *, b=1, h=2, dh=5, n=6, p=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = sum(hh * ww for hh, ww in shapes)
    value = torch.randn(b, s, h, dh, generator=g).to(dtype)
    loc = torch.rand(b, n, h, len(shapes), p, 2, generator=g).to(dtype)
    attn = torch.rand(b, n, h, len(shapes), p, generator=g).to(dtype)
    return value, loc, attn


def test_interpreter_cases():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "ops" / "triton_interpreter_cases.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert re.search(r"\b\d+ passed\b", tail) and "skipped" not in tail, tail


def test_cpu_needs_interpreter_and_auto_prefers_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shapes = [(2, 2)]
    value, loc, attn = _inputs(shapes)
    why = explain_backends(value, shapes, None, loc, attn)["triton"]
    assert why and "cpu" in why[0] and "TRITON_INTERPRET=1" in why[0]
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        multi_scale_deformable_attention(value, shapes, None, loc, attn, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        triton_deformable_attention(value, shapes, None, loc, attn)
    # "auto" on CPU never reaches the interpreter (the torch backend answers).
    out = multi_scale_deformable_attention(value, shapes, None, loc, attn)
    ref = multi_scale_deformable_attention(value, shapes, None, loc, attn, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bad_visibility_is_rejected():
    shapes = [(2, 2)] * 4
    value, loc, attn = _inputs(shapes, n=3)
    with pytest.raises(ValueError, match="divide"):
        triton_deformable_attention(value, shapes, None, loc, attn,
                                    visibility=torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(b=1, n=3, m\)"):
        triton_deformable_attention(value, shapes, None, loc, attn,
                                    visibility=torch.ones(1, 2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or integer"):
        triton_deformable_attention(value, shapes, None, loc, attn,
                                    visibility=torch.ones(1, 3, 2))


def test_interpret_flag_is_read_at_import_and_decoration(monkeypatch):
    # Why the interpreter cases run in a subprocess: triton.jit picks compiler or
    # interpreter when it decorates, and triton.language's own helpers (tl.sum, tl.max)
    # were decorated when it was imported, so setting the variable later cannot work.
    import triton
    from triton.language import standard

    from mmlayers.ops import _triton

    def kernel(x):
        pass

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert type(triton.jit(kernel)).__name__ == "JITFunction"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert type(triton.jit(kernel)).__name__ == "InterpretedFunction"
    assert type(standard.sum).__name__ == "JITFunction"  # still: fixed at import
    why = _triton._device_reasons(torch.device("cpu"))
    assert why and "set it before the first import of triton" in why[0]
    # The backend wraps its kernels per mode on demand, not at its own import.
    assert _triton._kernels(True)[0] is not _triton._kernels(False)[0]


def test_kernels_compile_for_sm90():
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from mmlayers.ops import _triton_kernels as src

    ints = {"n_queries", "n_tokens", "n_heads", "head_dim", "n_levels", "n_points",
            "levels_per_group", "vis_sb", "vis_sn", "vis_sm"}
    configs = [  # (kernel, value pointer type, compute type, has visibility)
        (src.deform_attn_fwd_kernel, "*bf16", tl.float32, True),
        (src.deform_attn_fwd_kernel, "*fp32", tl.float32, False),
        (src.deform_attn_bwd_kernel, "*bf16", tl.float32, True),
        (src.deform_attn_bwd_kernel, "*fp64", tl.float64, False),
    ]
    for kernel, vptr, compute, has_vis in configs:
        fn = JITFunction(kernel)
        cptr = "*fp64" if compute is tl.float64 else "*fp32"
        sig = {}
        for name in fn.arg_names:
            if name in ints:
                sig[name] = "i32"
            elif name in ("value_ptr", "out_ptr", "grad_out_ptr"):
                sig[name] = vptr
            elif name in ("meta_ptr", "vis_ptr"):
                sig[name] = "*u8" if name == "vis_ptr" and has_vis else "*i32"
            elif name.endswith("_ptr"):
                sig[name] = cptr
            else:
                sig[name] = "constexpr"
        ast = ASTSource(fn, signature=sig, constexprs=dict(
            HAS_VIS=has_vis, COMPUTE=compute, BLOCK_N=2, BLOCK_P=8, BLOCK_D=64))
        compiled = triton.compile(ast, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 8, "enable_fp_fusion": True})
        assert len(compiled.asm["cubin"]) > 1000
