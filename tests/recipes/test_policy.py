"""recipes/_policy.py: gradient checkpointing with synchronizers, frozen weights in bf16."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train  # noqa: E402
from _policy import store_frozen_in  # noqa: E402
from test_train_demo import MICRO, _losses  # noqa: E402

COMMON = MICRO + ["train.steps=3", "train.eval_every=0", "train.save_every=100"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_gradient_checkpointing_keeps_the_images_and_the_numbers(tmp_path):
    """LLM and UNet checkpointing. Plain LLM checkpointing recomputes the LLM layers without the images (the synchronizer
    context is closed before backward) and torch raises; the recipe's checkpointing gives
    the same losses and gradient norms as no checkpointing (recomputation is the same
    arithmetic; float noise only)."""
    plain = train.load_config(train.DEFAULT_CONFIG, COMMON + [f"train.out_dir={tmp_path / 'a'}"])
    train.train(plain)
    ckpt = train.load_config(train.DEFAULT_CONFIG, COMMON + [
        f"train.out_dir={tmp_path / 'b'}", "model.overrides.llm.gradient_checkpointing=true",
        "train.checkpoint_unet=true"])
    result = train.train(ckpt)
    assert result["model"].unet.is_gradient_checkpointing
    assert any(getattr(m, "gradient_checkpointing", False) for m in result["model"].llm.modules())
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step


def test_frozen_weights_in_bf16():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    store_frozen_in(model, "bf16")
    assert [p.dtype for p in model.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2
    store_frozen_in(model, None)
    assert model[0].weight.dtype == torch.bfloat16
    store_frozen_in(model, "fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="frozen_dtype must be null, 'bf16', 'fp16' or 'fp32'"):
        store_frozen_in(model, "int8")
