"""recipes/decoder_experiments.py: the image decoder alone, on an oracle or caption words."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))

import decoder_experiments  # noqa: E402

SMALL = ["model.overrides.decoder.unet.block_out_channels=[16, 32, 32]",
         "model.overrides.decoder.context_hidden=32", "model.overrides.decoder.context_queries=4",
         "model.overrides.decoder.num_inference_steps=2"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cond", ["oracle", "caption"])
def test_short_run_scores_and_saves(cond, tmp_path):
    out = tmp_path / "r.json"
    result = decoder_experiments.run(["--cond", cond, "--steps", "2", "--batch-size", "2",
                                      "--eval-docs", "3", "--threads", "1", "--out", str(out),
                                      "--save", str(tmp_path / "w.pt"), *SMALL])
    assert json.loads(out.read_text()) == result and result["steps"] == 2
    for key in ("color_present", "shape_present", "position", "exact"):
        assert 0.0 <= result[key] <= 1.0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    again = decoder_experiments.run(["--cond", cond, "--load", str(tmp_path / "w.pt"),
                                     "--eval-docs", "3", "--threads", "1", *SMALL])
    assert {k: again[k] for k in ("color_present", "shape_present", "position", "exact")} == \
        {k: result[k] for k in ("color_present", "shape_present", "position", "exact")}
