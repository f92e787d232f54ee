"""recipes/train.py refuses a bad configuration with one line, before anything is written:
unknown keys (with the nearest valid one), bad values, a bad --config, an out_dir that
holds a previous run, has nothing to resume or cannot be written."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))

import train  # noqa: E402
from test_train_demo import MICRO  # noqa: E402

# valid settings that make a run cheap, should a check under test let it start
CHEAP = MICRO + ["train.steps=1", "train.eval_every=0"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(("override", "message"), [
    ("train.stepz=2", "unknown config key train.stepz; did you mean train.steps?"),
    ("train.stpes=3", "unknown config key train.stpes; did you mean train.steps?"),
    ("trian.steps=3", "unknown config key trian; did you mean train?"),
    ("model.overrides.decodr.guidance_scale=3",
     "unknown config key model.overrides.decodr; did you mean model.overrides.decoder?"),
    ("model.overrides.llm.confg.hidden_size=8",
     "unknown config key model.overrides.llm.confg; did you mean model.overrides.llm.config?"),
    ("model.preset=tiyn", "bad value model.preset='tiyn' (str); expected one of 'tiny', "
                          "'paper_13b', 'paper_13b_shapes'; did you mean 'tiny'?"),
    ("train.steps=ten", "bad value train.steps='ten' (str); expected a positive integer"),
    ("train.steps=0", "bad value train.steps=0 (int); expected a positive integer"),
    ("train.steps=2.5", "bad value train.steps=2.5 (float); expected a positive integer"),
    ("train.jitter=true", "unknown config key train.jitter; did you mean data.jitter?"),
    ("data.jitter=maybe", "bad value data.jitter='maybe' (str); expected true or false"),
    ("train.betas=[0.9]", "bad value train.betas=[0.9] (list); expected a list of two numbers "
                          "in [0, 1)"),
    ("train.precision=bf15", "bad value train.precision='bf15' (str); expected one of 'auto', "
                             "'fp32', 'bf16', 'fp16'; did you mean 'bf16'?"),
    ("train.steps.x=1", "override 'train.steps.x=1': train.steps is a value (1000), not a "
                        "section with keys"),
    ("train.steps", "override 'train.steps' must look like key=value (e.g. train.steps=20)"),
    ("train={a: 1", "override 'train={a: 1': the value is not valid YAML"),
    ("data.kinds=[caption, edit]", "data.kinds holds ['caption']; expected kinds among "
                                   "caption_image, image_caption, edit, sequence"),
    ("data.source=webdata", "config key data.datasets is missing; expected a non-empty list "
                            "of dataset mappings"),
])
def test_bad_keys_and_values_are_one_line_errors(override, message):
    with pytest.raises(ValueError) as info:
        train.load_config(train.DEFAULT_CONFIG, [override])
    assert str(info.value) == message


@pytest.mark.parametrize(("datasets", "message"), [
    ("[{name: a, kind: pairs, shards: 'x/*.tar', weigth: 2}]",
     "unknown config key data.datasets[0].weigth; did you mean data.datasets[0].weight?"),
    ("[{name: a, kind: mmc4, shards: 'x/*.jsonl'}]",
     "config key data.datasets[0].images is missing; expected a string"),
    ("[{name: a, kind: pair, shards: 'x/*.tar'}]",
     "bad value data.datasets[0].kind='pair' (str); expected one of 'pairs', 'mmc4'; did you "
     "mean 'pairs'?"),
])
def test_web_datasets_are_checked(datasets, message):
    with pytest.raises(ValueError) as info:
        train.load_config(train.DEFAULT_CONFIG, ["data.source=webdata",
                                                 f"data.datasets={datasets}"])
    assert str(info.value) == message


def test_good_configs_pass_and_numbers_written_as_text_are_numbers():
    cfg = train.load_config(train.DEFAULT_CONFIG, ["train.lr=1e-3", "train.time_limit=null",
                                                   "train.frozen_dtype=bf16",
                                                   "model.overrides.llm.config.hidden_size=8"])
    assert cfg["train"]["lr"] == 0.001 and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["time_limit"] is None
    for path in (RECIPES / "configs").glob("*.yaml"):
        if path.name.startswith("accelerate_"):
            continue                         # accelerate's own configs, not the recipe's
        assert train.load_config(path)["train"]["steps"] > 0, path


def test_bad_config_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "broken.yaml").write_text("train:\n  steps: [1\n")
    cases = {tmp_path / "missing.yaml": "cannot be read: No such file or directory",
             tmp_path: "cannot be read: Is a directory",
             tmp_path / "list.yaml": "holds list, expected a mapping with model, data and "
                                     "train sections",
             tmp_path / "broken.yaml": "is not valid YAML (line 3)"}
    for path, message in cases.items():
        with pytest.raises(ValueError) as info:
            train.load_config(path)
        assert str(info.value).startswith(f"--config {str(path)!r} ")
        assert message in str(info.value)
    cfg = yaml.safe_load(train.DEFAULT_CONFIG.read_text())
    del cfg["train"]["steps"]
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"^config key train.steps is missing; expected a "
                                         r"positive integer$"):
        train.load_config(tmp_path / "short.yaml")


def _main_fails(argv, capsys) -> str:
    """train.main(argv) (options first, then CHEAP, then the overrides) must exit with one
    line and no traceback."""
    options = [a for i, a in enumerate(argv) if a.startswith("--")
               or i and argv[i - 1] == "--config"]
    with pytest.raises(SystemExit) as info:
        train.main(options + CHEAP + [a for a in argv if a not in options])
    message = str(info.value.code)
    assert message.startswith("train.py: ") and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err
    return message


def test_main_refuses_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    for argv in (["train.stepz=2"], ["model.preset=tiyn"], ["train.steps=ten"],
                 ["--config", str(tmp_path / "nope.yaml")]):
        message = _main_fails(argv + [f"train.out_dir={out}"], capsys)
        assert message.split(": ", 1)[1].split(" ")[0] in ("unknown", "bad", "--config")
        assert not out.exists()


def test_out_dir_with_a_previous_run_or_nothing_to_resume(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("")
    assert _main_fails([f"train.out_dir={out}"], capsys) == (
        f"train.py: train.out_dir={str(out)!r} holds a previous run (checkpoints, "
        f"metrics.jsonl); it has no checkpoint: remove it or choose a new train.out_dir")
    assert _main_fails([f"train.out_dir={out}", "--resume"], capsys) == (
        f"train.py: --resume: train.out_dir={str(out)!r} has no checkpoint "
        f"(checkpoints/latest is missing); run without --resume to start")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]
    (out / "checkpoints" / "latest").write_text("step_000002")
    assert _main_fails([f"train.out_dir={out}"], capsys) == (
        f"train.py: train.out_dir={str(out)!r} holds a previous run (checkpoints, "
        f"metrics.jsonl); continue it with --resume or choose a new train.out_dir")


def test_unwritable_out_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"                     # a path below a regular file
    assert _main_fails([f"train.out_dir={out}"], capsys) == (
        f"train.py: train.out_dir={str(out)!r} is not a writable directory (Not a directory); "
        f"expected a directory this user can create and write, e.g. train.out_dir=outputs/run")
    # train() itself (as the demo calls it) refuses before building anything
    cfg = train.load_config(train.DEFAULT_CONFIG, [f"train.out_dir={out}", "train.threads=1"])
    with pytest.raises(ValueError, match="is not a writable directory"):
        train.train(cfg)
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # permissions do not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "Permission denied" in _main_fails([f"train.out_dir={locked / 'run'}"], capsys)
