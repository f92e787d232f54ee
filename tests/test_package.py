"""Package-level contracts: light import, flat namespace."""

from __future__ import annotations

import subprocess
import sys

import mmlayers


def test_import_needs_only_torch_and_einops():
    code = ("import sys, mmlayers, mmlayers.adapters, mmlayers.data; "
            "print(sorted(m for m in ('transformers', 'diffusers', 'triton', 'PIL', 'tokenizers')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_headline_names_are_exported():
    for name in mmlayers.__all__:
        assert getattr(mmlayers, name).__module__.startswith("mmlayers")
    assert mmlayers.FeatureSynchronizer is mmlayers.layers.FeatureSynchronizer
