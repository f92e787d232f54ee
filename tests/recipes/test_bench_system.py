"""recipes/bench/system.py: the tiny preset end to end on CPU, and the pieces it relies on."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))

import benchmark  # noqa: E402

from bench import _system_util as su  # noqa: E402
from bench import system  # noqa: E402
from bench._common import set_json_output  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tiny_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "system.json"
    try:   # as users run it: benchmark.py takes --json and records the table
        benchmark.main(["system", "--json", str(out), "--preset", "tiny", "--device", "cpu",
                        "--threads", "1", "--tokens", "128", "--images", "2", "4",
                        "--repeats", "1", "--decode", "2", "--gen-steps", "2"])
    finally:
        set_json_output(None)
    printed = capsys.readouterr().out
    assert "| train: mmlayers " in printed and "| infer: time to first token" in printed
    assert "ratios:" in printed and "targets at 4 images" in printed
    saved = json.loads(out.read_text())
    assert saved["suite"] == "system" and len(saved["tables"]) == 1
    assert len(saved["tables"][0]["rows"]) == 4 * 2 + 3
    rep = saved["details"]
    assert rep["errors"] == []
    for key in ("date", "device", "device_name", "torch", "triton", "settings", "parameters",
                "train", "ratios", "inference"):
        assert key in rep, key
    assert rep["settings"]["tokens"] == 128 and rep["settings"]["dtype"] == "float32"
    assert {(r["variant"], r["images"]) for r in rep["train"]} == {
        (v, m) for v in system.VARIANTS for m in (2, 4)}
    for r in rep["train"]:
        assert math.isfinite(r["s_per_step"]) and r["s_per_step"] > 0
        assert r["tokens_per_s"] == pytest.approx(128 / r["s_per_step"])
        assert r["images_per_s"] == pytest.approx(r["images"] / r["s_per_step"])
        assert r["peak_gib"] > 0
        if r["variant"] in ("mmlayers", "official, grid_sample op"):
            s = r["shares"]
            assert sum(s.values()) == pytest.approx(1.0)
            for part in ("vision", "llm", "synchronizers", "unet", "optimizer"):
                assert 0 < s[part] < 1, (r["variant"], part, s)
        if r["variant"] == "mmlayers":
            assert r["model_tflop"] > 0 and r["mfu"] is None      # no bf16 peak on CPU
    for m in ("2", "4"):
        ratios = rep["ratios"][m]
        for key in ("step_vs_no_sync", "official_step_vs_ours", "grid_sample_step_vs_ours",
                    "sync_part_official_vs_ours_profiled"):
            assert math.isfinite(ratios[key]) and ratios[key] > 0, (m, key)
    inf = rep["inference"]
    assert inf["ttft_s"] > 0 and inf["decode_tokens_per_s"] > 0 and inf["s_per_image"] > 0
    assert rep["parameters"]["llm"]["trainable"] == 0          # the paper's freezing
    assert rep["parameters"]["vit"]["trainable"] == 0
    assert rep["parameters"]["unet"]["trainable"] == rep["parameters"]["unet"]["total"] > 0


def test_official_sync_computes_the_same_function():
    torch.manual_seed(0)
    from mmlayers.adapters.llm import SynchronizerBlock

    blk = SynchronizerBlock(hidden_size=16, value_dim=8, heads=2, points=2, level_sizes=(4, 2),
                            base_size=2, max_images=6)
    nn.init.constant_(blk.gate, 0.7)
    official = su.OfficialSync(blk.sync, "reference")
    nn.init.normal_(official.inner.sampling_offsets.weight, std=0.3)
    blk.sync.load_official_state_dict(official.inner.state_dict())
    h, feats = torch.randn(1, 7, 16), torch.randn(1, 3, 20, 8)
    vis = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1],
                        [1, 1, 1]], dtype=torch.bool)[None]
    ours = blk(h, blk.prepare_values(feats), vis)
    blk.sync = official
    theirs = blk(h, blk.prepare_values(feats), vis)
    assert ours.abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_model_flops_skip_checkpoint_recompute():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8, requires_grad=True)

    def run(ckpt):
        y = checkpoint(net, x, use_reentrant=False) if ckpt else net(x)
        y.sum().backward()

    with su.ModelFlops() as plain:
        run(False)
    with su.ModelFlops() as ckpt:
        run(True)
    with FlopCounterMode(display=False) as hardware, set_checkpoint_early_stop(False):
        run(True)
    # forward 2·5·(8·16 + 16·4); backward: input and weight gradient of both Linears (2 ×
    # forward); checkpointing recomputes the forward once more, which ModelFlops leaves out
    fwd = 2 * 5 * (8 * 16 + 16 * 4)
    assert plain.get_total_flops() == 3 * fwd
    assert ckpt.get_total_flops() == 3 * fwd
    assert hardware.get_total_flops() == 4 * fwd


def test_build_applies_the_paper_training_policy():
    model = system.build("tiny", "cpu", torch.float32)
    llm_ckpt = getattr(model.llm, "is_activation_checkpointing", None)
    if llm_ckpt is None:   # transformers < 5
        llm_ckpt = model.llm.is_gradient_checkpointing
    assert llm_ckpt and model.unet.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.visual.vit.parameters())
    assert all(p.requires_grad for p in model.llm_sync.parameters())
    batch = su.synthetic_batch(model, tokens=64, images=2, image_size=32)
    assert batch.input_ids.shape == (1, 64)
    assert (batch.input_ids == model.config.tokens.image_id).sum() == 2 * 8
    assert batch.image_previous.tolist() == [-1, 0]
