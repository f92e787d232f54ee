"""recipes/generate.py: both input formats, its outputs, and inputs it refuses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

import generate  # noqa: E402

from mmlayers.data import to_pil, word_level_tokenizer  # noqa: E402
from mmlayers.models import MMInterleaved, MMInterleavedConfig  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = word_level_tokenizer(["a red green blue circle square on the left right ."])
    cfg = MMInterleavedConfig.tiny(vocab_size=len(tok))
    cfg.llm.config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    cfg.vision.num_tokens, cfg.vision.resampler_depth = 4, 1
    cfg.decoder.unet.update(block_out_channels=[16, 32, 32], cross_attention_dim=32,
                            attention_head_dim=4)
    cfg.decoder.context_hidden, cfg.decoder.context_queries = 32, 6
    torch.manual_seed(0)
    MMInterleaved.from_config(cfg, tokenizer=tok).save_pretrained(root / "model")
    to_pil(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))).save(root / "x.png")
    official = [{"sentences": ["a red circle ."], "images": ["x.png"], "sentence_ixs": [0],
                 "image_first": [False], "generate_mode": "generate_images", "num_iter": 1},
                {"sentences": ["a blue"], "images": ["x.png"], "sentence_ixs": [0],
                 "image_first": [True], "generate_mode": "generate_texts", "num_iter": 1}]
    ours = [{"items": ["a green square", {"image": "x.png"}], "generate": "interleaved",
             "turns": 2, "max_new_tokens": 3},
            {"items": ["a red circle ."], "generate": "image", "turns": 2, "seed": 3}]
    (root / "official.json").write_text(json.dumps(official))
    (root / "ours.json").write_text(json.dumps(ours))
    return root


def run(saved, name, out, *extra):
    return generate.main(["--model", str(saved / "model"), "--input", str(saved / name),
                          "--out", str(out), "--steps", "2", "--max-new-tokens", "4", *extra])


def test_official_format(saved, tmp_path):
    docs = run(saved, "official.json", tmp_path / "o")
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["generate"] for r in results] == ["image", "text"]
    first = results[0]["items"]
    assert [("text" in x, x["generated"]) for x in first] == [(True, False), (False, False),
                                                              (False, True)]
    for x in first[1:]:
        assert (tmp_path / "o" / x["image"]).is_file()
    assert docs[0][-1][0].shape == (3, 32, 32)               # the generated image
    second = results[1]["items"]
    assert second[0]["image"] and second[1] == {"text": "a blue", "generated": False}
    assert all(x["generated"] for x in second[2:])          # greedy text, if any
    page = (tmp_path / "o" / "index.html").read_text()
    assert page.count("<img") == 3 and "Request 1 (text)" in page


def test_our_format_and_reproducible_images(saved, tmp_path):
    docs = run(saved, "ours.json", tmp_path / "a")
    again = run(saved, "ours.json", tmp_path / "b")
    images = [x for x, gen in docs[1] if gen]
    assert len(images) == 2 and all(isinstance(x, torch.Tensor) for x in images)
    for (x, _), (y, _) in zip(docs[1], again[1], strict=True):   # same seed, same images
        assert x == y if isinstance(x, str) else torch.equal(x, y)
    interleaved = docs[0]
    flags = [g for _, g in interleaved]   # the prompt, then whatever the model wrote
    assert flags[:2] == [False, False] and all(flags[2:])


def test_refuses_bad_input_and_writes_nothing(saved, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"items": [{"image": "missing.png"}]}]))
    with pytest.raises(SystemExit, match="missing.png"):
        generate.main(["--model", str(saved / "model"), "--input", str(tmp_path / "bad.json"),
                       "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no config.json"):
        run(saved, "ours.json", tmp_path / "o", "--model", str(tmp_path))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an empty directory"):
        run(saved, "ours.json", tmp_path / "full")
    assert not (tmp_path / "o").exists()
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "full"]
