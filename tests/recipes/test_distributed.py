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


def test_parallel_settings_are_checked():
    t = {"batch_size": 6, "noise": "per_batch"}
    assert train.check_parallel(t, 2) == 3 and train.check_parallel(t, 1) == 6
    with pytest.raises(ValueError, match="batch_size=5 must be divisible by the 2 processes"):
        train.check_parallel({**t, "batch_size": 5}, 2)
    with pytest.raises(ValueError, match="use train.noise=per_batch with 2 processes"):
        train.check_parallel({**t, "noise": "stream"}, 2)
    assert train.check_parallel({**t, "noise": "stream"}, 1) == 6
    with pytest.raises(ValueError, match="'stream' or 'per_batch'"):
        train.check_parallel({**t, "noise": "fresh"}, 1)


def _web_shards(root: Path) -> list[str]:
    """Two MMC4 JSONL shards and one tar shard of pairs, in the shapes vocabulary."""
    import io
    import json
    import tarfile

    from PIL import Image

    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    (root / "img").mkdir(parents=True)
    for name, rgb in colors.items():
        Image.new("RGB", (16, 16), rgb).save(root / "img" / f"{name}.png")
    for shard in range(2):
        with open(root / f"docs_{shard}.jsonl", "w") as f:
            for i in range(12):
                a, b = list(colors)[(i + shard) % 3], list(colors)[(i + 1) % 3]
                f.write(json.dumps({"text_list": [f"a {a} square.", f"now the same in {b}."],
                                    "image_info": [
                                        {"image_name": f"{a}.png", "matched_text_index": 0,
                                         "matched_sim": 0.3},
                                        {"image_name": f"{b}.png", "matched_text_index": 1,
                                         "matched_sim": 0.3}]}) + "\n")
    with tarfile.open(root / "pairs_0.tar", "w") as tar:
        for i in range(12):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), list(colors.values())[i % 3]).save(buf, "PNG")
            for name, blob in ((f"{i:03d}.png", buf.getvalue()),
                               (f"{i:03d}.txt", f"a {list(colors)[i % 3]} circle".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    datasets = [{"name": "mmc4", "kind": "mmc4", "shards": str(root / "docs_*.jsonl"),
                 "images": str(root / "img"), "weight": 2, "max_images": 2,
                 "single_image_keep": 1.0},
                {"name": "pairs", "kind": "pairs", "shards": str(root / "pairs_*.tar"),
                 "weight": 1}]
    return ["data.source=webdata", "data.max_images=3", "data.epochs=null",
            f"data.datasets={json.dumps(datasets)}"]


def test_streamed_web_data_resumes_exactly(tmp_path):
    """MMC4 + pair shards, mixed and packed: an interrupted run resumes at the next rows."""
    web = _web_shards(tmp_path / "data")
    common = COMMON + web + ["train.batch_size=2", "train.steps=4", "train.noise=stream"]
    full = train.load_config(train.DEFAULT_CONFIG, common + [f"train.out_dir={tmp_path / 'a'}"])
    train.train(full)
    part = train.load_config(train.DEFAULT_CONFIG, common + [f"train.out_dir={tmp_path / 'b'}",
                                                             "train.stop_after=2"])
    train.train(part)
    state = torch.load(tmp_path / "b" / "checkpoints" / "step_000002" / "trainer.pt",
                       weights_only=False)
    (position,) = state["data"]                                  # one process
    assert position["slots"] and position["num_slots"] == 1
    part["train"]["stop_after"] = None
    train.train(part, resume=True)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    assert a[3] != a[2]


def test_streamed_web_data_splits_over_two_processes(tmp_path):
    """Each process reads its own slot of the shards; their positions are checkpointed and
    a resume with another number of processes is refused (the slots would not line up)."""
    web = _web_shards(tmp_path / "data")
    run = _launch_two(tmp_path / "run", [*web, "train.batch_size=4", "train.steps=2"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_000002" / "trainer.pt",
                       weights_only=False)
    assert [sorted(s["slots"]) for s in state["data"]] == [[0], [1]]
    assert {s["num_slots"] for s in state["data"]} == {2}
    cfg = train.load_config(train.DEFAULT_CONFIG, COMMON + web + [
        "train.batch_size=2", "train.steps=3", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="positions of 2 processes; resume it with that many"):
        train.train(cfg, resume=True)
