"""Ctrl-C during the demo's training: the step in progress finishes and is checkpointed, the
run ends with one line that says how to resume (no traceback), and resuming from that line
ends with the losses and weights of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))

import train  # noqa: E402
from test_train_demo import MICRO, _losses  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_ctrl_c_in_the_demo_checkpoints_and_says_how_to_resume(tmp_path):
    from safetensors.torch import load_file

    demo = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-u", str(RECIPES / "demo.py"), "--quick", "--steps", "8",
         "--out", str(demo), *MICRO],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = []
    for line in proc.stdout:                       # Ctrl-C once step 2 is logged
        seen.append(line)
        if "step 2/8" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=600)
    output = "".join(seen) + rest + err
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    run = demo / "train"
    step = int((run / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 2 <= step < 8
    assert err.strip().splitlines()[-1] == (
        f"train.py: stopped by Ctrl-C after step {step} of 8; kept "
        f"{run / 'checkpoints' / f'step_{step:06d}'} and metrics.jsonl; continue with: "
        f"python recipes/train.py --config {run / 'config.yaml'} --resume")
    assert sorted(_losses(run)) == list(range(1, step + 1))     # every step logged
    assert not (run / "model").exists() and not (demo / "index.html").exists()

    # the oracle: the same config (as saved by the run), never interrupted
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["out_dir"] = str(tmp_path / "ref")
    train.train(cfg)
    train.main(["--config", str(run / "config.yaml"), "--resume"])   # as the message says
    ref = _losses(tmp_path / "ref")
    got = _losses(run)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for s in range(1, 9):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-7), s
    wa = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    wb = load_file(run / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7, msg=k)
    rows = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert rows == list(range(1, 9))
