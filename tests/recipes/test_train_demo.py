"""recipes/train.py and recipes/demo.py: overrides, exact resume, and a very short demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))

import demo  # noqa: E402
import train  # noqa: E402

# A micro model and tiny batches: the recipes' machinery, not the learning, is under test.
MICRO = ["model.overrides.llm.config.hidden_size=64", "model.overrides.llm.config.num_hidden_layers=2",
         "model.overrides.llm.config.intermediate_size=128", "model.overrides.vision.num_tokens=4",
         "model.overrides.vision.resampler_depth=1",
         "model.overrides.decoder.unet.block_out_channels=[16, 32, 32]",
         "model.overrides.decoder.unet.cross_attention_dim=32",
         "model.overrides.decoder.unet.attention_head_dim=4",
         "model.overrides.decoder.context_hidden=32", "model.overrides.decoder.context_queries=6",
         "train.batch_size=3", "train.warmup=2", "train.eval_docs=2", "train.log_every=1",
         "train.threads=1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_overrides_parse_as_yaml(tmp_path):
    cfg = train.load_config(train.DEFAULT_CONFIG, ["train.steps=7", "train.betas=[0.5, 0.6]",
                                                   "model.overrides.decoder.guidance_scale=3",
                                                   "train.time_limit=null"])
    assert cfg["train"]["steps"] == 7 and cfg["train"]["betas"] == [0.5, 0.6]
    assert cfg["model"]["overrides"] == {"decoder": {"guidance_scale": 3}}
    assert cfg["train"]["time_limit"] is None
    with pytest.raises(ValueError, match="key=value"):
        train.load_config(train.DEFAULT_CONFIG, ["train.steps"])


def _losses(out_dir: Path) -> dict[int, tuple]:
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return {r["step"]: (r["loss"], r["text_loss"], r["image_loss"], r["grad_norm"])
            for r in rows if "loss" in r}


def _lrs(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, open(out_dir / "metrics.jsonl"))
            if "lr" in r}


def test_resume_continues_exactly(tmp_path):
    """Interrupted after step 2 and resumed: the LR of every step, the losses and the final
    weights are those of the uninterrupted run (which is the oracle)."""
    from safetensors.torch import load_file

    common = MICRO + ["train.steps=6", "train.save_every=2", "train.eval_every=0"]
    full = train.load_config(train.DEFAULT_CONFIG, common + [f"train.out_dir={tmp_path / 'a'}"])
    train.train(full)
    part = train.load_config(train.DEFAULT_CONFIG, common + [f"train.out_dir={tmp_path / 'b'}",
                                                             "train.stop_after=2"])
    train.train(part)                                     # "interrupted" after step 2
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step_000002"
    part["train"]["stop_after"] = None
    train.train(part, resume=True)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    lr_a, lr_b = _lrs(tmp_path / "a"), _lrs(tmp_path / "b")
    assert len(set(lr_a.values())) >= 4            # warm-up and cosine: the LR moves every step
    assert lr_b == pytest.approx(lr_a, rel=1e-12)
    for step in (3, 4, 5, 6):
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7, msg=k)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_000004", "step_000006"]   # no .tmp left behind


def test_short_demo_writes_its_page(tmp_path):
    metrics = demo.run(["--quick", "--steps", "2", "--eval-docs", "2", "--out", str(tmp_path),
                        *MICRO])
    page = (tmp_path / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 * 1 + 2 * 2 + 2 * 3   # per example
    assert "Captions: exact (colour, shape, size and position)" in page
    assert "Same shape, new colour" in page and "2 of 2 evaluated examples shown" in page
    tables = page.split("</style>", 1)[1].split("<h2>Captioning")[0]
    assert "cut short" not in page and "{" not in tables and "_" not in tables  # no raw keys
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["train_steps"] == 2 and saved["eval_images"] == {"captions": 2, "t2i": 2,
                                                                  "edits": 2}
    assert 0.0 <= saved["caption_exact"] <= saved["caption_color_shape"] <= 1.0
    assert saved["stopped_by_time_limit"] is False and metrics == saved
    assert (tmp_path / "train" / "model" / "model.safetensors").exists()


def test_fixed_step_run_is_deterministic(tmp_path):
    """The same config twice gives the same losses, bit for bit (fixed seeds, fixed steps)."""
    common = MICRO + ["train.steps=3", "train.eval_every=0", "train.save_every=100"]
    for name in ("a", "b"):
        train.train(train.load_config(train.DEFAULT_CONFIG,
                                      common + [f"train.out_dir={tmp_path / name}"]))
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == [1, 2, 3] and a == b


def test_rerun_starts_a_new_metrics_file(tmp_path):
    common = MICRO + ["train.steps=2", "train.eval_every=0", "train.save_every=100",
                      f"train.out_dir={tmp_path}"]
    train.train(train.load_config(train.DEFAULT_CONFIG, common))
    train.train(train.load_config(train.DEFAULT_CONFIG, common))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2]


def test_time_budget_cuts_training_and_the_page_says_so(tmp_path):
    # A budget far below the measured evaluation time leaves no training time: the run
    # stops after its first step and reports it.
    metrics = demo.run(["--steps", "50", "--eval-docs", "2", "--time-budget", "0.001",
                        "--out", str(tmp_path), *MICRO, "train.eval_every=0"])
    assert metrics["stopped_by_time_limit"] is True
    assert metrics["train_steps"] == 1 and metrics["planned_steps"] == 50
    page = (tmp_path / "index.html").read_text()
    assert "cut short by the time budget" in page and "1 of 50" in page


def test_ctrl_c_during_evaluation_exits_with_one_line(tmp_path, monkeypatch, caplog):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "evaluate", interrupted)
    with pytest.raises(SystemExit) as info:
        demo.run(["--steps", "1", "--eval-docs", "2", "--out", str(tmp_path), *MICRO,
                  "train.eval_every=0"])
    assert info.value.code == 130
    assert "stopped by Ctrl-C during the evaluation" in caplog.text
    assert str(tmp_path / "train" / "model") in caplog.text
    assert (tmp_path / "train" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "index.html").exists()


def test_a_bad_config_leaves_no_output_folder(tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(ValueError, match="train.stepz"):
        demo.run(["--quick", "--out", str(out), "train.stepz=3"])
    assert not out.exists()
