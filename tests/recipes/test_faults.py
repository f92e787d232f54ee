"""recipes/train.py under faults: a process killed with SIGKILL while it writes a checkpoint
resumes from the last complete one and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))

import train  # noqa: E402
from test_train_demo import MICRO, _losses  # noqa: E402

# Runs train.train in a fresh process and kills it (SIGKILL: no cleanup, no finally blocks)
# after the model file of checkpoint 4 is written, before its trainer state and the
# rename that completes it.
KILLER = """
import os, signal, sys, json
sys.path.insert(0, {recipes!r})
import _checkpoint, train
real = _checkpoint.save_model
def save_model(acc, model, directory):
    real(acc, model, directory)
    if str(directory).endswith("step_000004.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
_checkpoint.save_model = save_model
train.train(json.loads({cfg!r}))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_while_writing_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    common = MICRO + ["train.steps=6", "train.save_every=2", "train.eval_every=0"]
    full = train.load_config(train.DEFAULT_CONFIG, common + [f"train.out_dir={tmp_path / 'a'}"])
    train.train(full)
    part = train.load_config(train.DEFAULT_CONFIG, common + [f"train.out_dir={tmp_path / 'b'}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER.format(recipes=str(RECIPES),
                                                               cfg=json.dumps(part))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = tmp_path / "b" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_000002"     # the last complete checkpoint
    assert (ckpt / "step_000004.tmp" / "model.safetensors").exists()   # the torn one
    assert not (ckpt / "step_000004.tmp" / "trainer.pt").exists()
    train.train(part, resume=True)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    rows = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert rows == [1, 2, 3, 4, 5, 6]   # the killed run's steps 3-4 were dropped on resume
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7, msg=k)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_000004", "step_000006"]
