"""A core-only install that reaches an optional feature is told which extra to install."""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch
from torch import nn

from mmlayers._optional import require


def _qformer():
    from mmlayers.layers.qformer import QFormerResampler

    QFormerResampler(dim=8, num_queries=2, depth=1, num_heads=2, mlp_dim=16)


def _build_llm():
    from mmlayers.models.builders import build_llm
    from mmlayers.models.config import LLMConfig

    build_llm(LLMConfig(config={"model_type": "llama"}))


def _build_scheduler():
    from mmlayers.models.builders import build_scheduler
    from mmlayers.models.config import DecoderConfig

    build_scheduler(DecoderConfig())


def _vit_from_config():
    from mmlayers.vision import VisualTokenizer

    VisualTokenizer.from_config(None, llm_dim=8)


def _vit_from_path(tmp_path):
    from mmlayers.vision import VisualTokenizer

    VisualTokenizer.from_pretrained_vit(str(tmp_path), llm_dim=8)


def _word_level_tokenizer():
    from mmlayers.data.tokenizer import word_level_tokenizer

    word_level_tokenizer(["a red circle."])


def _query_positions():
    from mmlayers.adapters.query_positions import CrossAttentionPositions

    CrossAttentionPositions(nn.Module(), (4, 4))


def _to_pil():
    from mmlayers.data.images import to_pil

    to_pil(torch.zeros(3, 2, 2))


def _read_image(tmp_path):
    from mmlayers.data.images import read_image

    read_image(tmp_path / "x.png")


def _load_image():
    from mmlayers.data.mmc4 import load_image

    load_image(io.BytesIO(b""), None)


def _render_shapes():
    from mmlayers.data.shapes import ShapeAttributes, render_shapes

    render_shapes([(ShapeAttributes("red", "square", "left", "large"), 0, 11)])


# (missing package, the extra the message must name, the feature that reaches it)
SITES = [
    ("transformers", "hf", _qformer),
    ("transformers", "hf", _build_llm),
    ("transformers", "hf", _vit_from_config),
    ("transformers", "hf", _vit_from_path),
    ("transformers", "data", _word_level_tokenizer),
    ("diffusers", "diffusion", _build_scheduler),
    ("diffusers", "diffusion", _query_positions),
    ("PIL", "data", _to_pil),
    ("PIL", "data", _read_image),
    ("PIL", "data", _load_image),
    ("PIL", "data", _render_shapes),
]


@pytest.mark.parametrize(("package", "extra", "feature"), SITES,
                         ids=[f"{f.__name__[1:]}-{p}" for p, _, f in SITES])
def test_feature_without_its_package_names_the_extra(monkeypatch, tmp_path, package, extra,
                                                       feature):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails
    call = (lambda: feature(tmp_path)) if "tmp_path" in feature.__code__.co_varnames else feature
    with pytest.raises(ImportError, match=re.escape(f'pip install "mmlayers[{extra}]"')) as info:
        call()
    assert info.value.name == package


def test_require_returns_the_module():
    import einops

    assert require("einops") is einops
    assert require("torch.nn.functional") is torch.nn.functional


def test_missing_package_message_names_package_and_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ModuleNotFoundError) as info:
        require("diffusers.schedulers")
    msg = str(info.value)
    assert "'diffusers'" in msg and 'pip install "mmlayers[diffusion]"' in msg
    assert 'pip install -e ".[diffusion]"' in msg
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ModuleNotFoundError, match="'pillow'.*mmlayers\\[data\\]"):
        require("PIL")


def test_a_broken_dependency_of_an_installed_package_is_not_disguised(monkeypatch, tmp_path):
    pkg = tmp_path / "mmlayers_fake_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import mmlayers_fake_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("mmlayers_fake_pkg", "hf")
    assert info.value.name == "mmlayers_fake_missing_dependency"
    assert "mmlayers[" not in str(info.value)


def test_package_without_an_extra_keeps_the_plain_error():
    with pytest.raises(ModuleNotFoundError, match="No module named 'mmlayers_no_such_pkg'"):
        require("mmlayers_no_such_pkg")
