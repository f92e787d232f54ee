"""recipes/train.py in two processes (DDP over gloo on the CPU) against one process.

The global batch of a step is the same in both runs: 6 samples, as 2 processes x 3
samples (``batch_size=6``) or 1 process x 2 accumulated micro-batches of 3
(``batch_size=3, grad_accum=2``), with ``train.noise=per_batch`` so that each micro-batch
draws the same diffusion noise wherever it runs. Then the step's gradient is
(g0 + g1) / 2 in both runs: DDP sums the two processes' gradients in an all-reduce and
divides by 2, accumulation adds g0 / 2 and g1 / 2 (halving is exact in floating point and a
sum of two terms does not depend on their order), so the losses agree to rounding. The
stated tolerance, rel 1e-5, leaves room for a different summation order inside gloo or
the float64 averaging of the logged losses; we observe equal values. Any data mix-up
(both ranks reading the same samples) or missing gradient synchronisation moves the
losses by far more (several percent after one update).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train  # noqa: E402
from test_train_demo import MICRO, _losses  # noqa: E402

pytest.importorskip("accelerate")

COMMON = [m for m in MICRO if not m.startswith("train.batch_size")] + [
    "train.steps=5", "train.save_every=100", "train.eval_every=0", "train.noise=per_batch"]
ONE_PROCESS = ["train.batch_size=3", "train.grad_accum=2"]      # 6 samples per step
TOL = dict(rel=1e-5, abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(out: Path, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(RECIPES / "configs" / "accelerate_cpu_2proc.yaml"),
           "--main_process_port", str(_free_port()), str(RECIPES / "train.py"),
           *COMMON, "train.batch_size=6", f"train.out_dir={out}", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""                       # CPU + gloo even on a GPU machine
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_two_processes_match_one_and_resume_in_one(tmp_path):
    two = tmp_path / "two"
    run = _launch_two(two, ["train.stop_after=3"])               # steps 1-3 in 2 processes
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "process 1 of 2 (MULTI_CPU" in run.stdout + run.stderr
    state = torch.load(two / "checkpoints" / "step_000003" / "trainer.pt", weights_only=False)
    assert (state["step"], state["samples"], state["world_size"]) == (3, 18, 2)
    assert sorted(_losses(two)) == [1, 2, 3]                     # rank 0 alone writes logs

    cfg = train.load_config(train.DEFAULT_CONFIG, COMMON + ONE_PROCESS + [f"train.out_dir={two}"])
    train.train(cfg, resume=True)                                # steps 4-5 in 1 process
    ref = tmp_path / "one"
    train.train(train.load_config(train.DEFAULT_CONFIG,
                                  COMMON + ONE_PROCESS + [f"train.out_dir={ref}"]))
    a, b = _losses(two), _losses(ref)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert a[step] == pytest.approx(b[step], **TOL), step
    assert a[5][0] < a[1][0]                                     # and it is training
    assert (two / "checkpoints" / "latest").read_text() == "step_000005"


def test_batch_must_split_over_processes(tmp_path):
    run = _launch_two(tmp_path, ["train.batch_size=5", "train.steps=1"])
    assert run.returncode != 0
    assert "train.batch_size=5 must be divisible by the 2 processes" in run.stderr + run.stdout


def test_stream_noise_is_single_process_only(tmp_path):
    run = _launch_two(tmp_path, ["train.noise=stream", "train.steps=1"])
    assert run.returncode != 0
    assert "train.noise=per_batch" in run.stderr + run.stdout
