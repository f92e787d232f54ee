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
    # the interleaved request: the prompt, then each of its 2 turns wrote text (this model
    # opens no image); an untrained model's favourite tokens are <pad> and <unk>, which
    # would decode to nothing: they are never generated
    interleaved = docs[0]
    assert [g for _, g in interleaved] == [False, False, True, True]
    assert all(isinstance(x, str) and x.strip() for x, _ in interleaved[2:])
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [(r["turns"], r["turns_done"]) for r in results] == [(2, 2), (2, 2)]


def _stopper(saved, out):
    """The saved model made to end every document at once: all text logits equal (0), so
    greedy decoding takes the lowest allowed id, ``</s>`` (``<pad>``, ``<s>`` are masked)."""
    model = MMInterleaved.from_pretrained(saved / "model")
    with torch.no_grad():
        model.llm.get_output_embeddings().weight.zero_()
        model.image_tokens.head.weight.zero_()
        model.image_tokens.head.bias.fill_(-1e4)          # <soi> never
    assert model.tokenizer.convert_ids_to_tokens(2) == "</s>"
    model.save_pretrained(out)
    return out


def test_under_delivery_and_unknown_words_are_reported(saved, tmp_path, caplog):
    model = _stopper(saved, tmp_path / "stop")
    reqs = [{"items": ["a purple hexagon on the left", {"image": str(saved / "x.png")}],
             "generate": "interleaved", "turns": 2},
            {"items": [{"image": str(saved / "x.png")}], "generate": "text", "turns": 3}]
    (tmp_path / "r.json").write_text(json.dumps(reqs))
    with caplog.at_level("WARNING", logger="generate"):
        docs = generate.main(["--model", str(model), "--input", str(tmp_path / "r.json"),
                              "--out", str(tmp_path / "o"), "--max-new-tokens", "3"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings[0] == ("request 0: 2 word(s) not in the model's vocabulary, read as "
                           "<unk>: 'purple', 'hexagon'")
    assert warnings[1] == ("request 0: asked for 2 interleaved turn(s), 0 produced text or "
                           "an image: the model ended the document (</s>) in turn 1")
    # a text request after an image writes at least one token per turn, then the model
    # ends the document: 1 of 3 turns, said so
    assert warnings[2] == ("request 1: asked for 3 text turn(s), 1 produced text or an "
                           "image: the model ended the document (</s>) in turn 1")
    assert len(warnings) == 3
    assert [g for _, g in docs[0]] == [False, False] and [g for _, g in docs[1]] == [False, True]
    assert docs[1][1][0] == "."                         # the lowest visible id
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [(r["turns"], r["turns_done"]) for r in results] == [(2, 0), (3, 1)]


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


def test_official_decoding_defaults_and_overrides():
    base = ["--model", "m", "--input", "i", "--out", "o"]
    a = generate.parse(base + ["--official"])
    assert (a.max_new_tokens, a.min_new_tokens, a.repetition_penalty, a.top_p, a.sample) == \
        (90, 8, 1.3, 0.9, True)
    b = generate.parse(base + ["--official", "--max-new-tokens", "5", "--repetition-penalty", "1"])
    assert (b.max_new_tokens, b.repetition_penalty) == (5, 1.0)
    c = generate.parse(base)
    assert (c.max_new_tokens, c.min_new_tokens, c.repetition_penalty, c.top_p, c.sample) == \
        (32, 0, 1.0, None, False)


def test_official_semantics_regenerate_last_image_and_texts_open_images(saved, tmp_path):
    to_pil(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))).save(
        saved / "y.png")
    reqs = [{"sentences": ["a red circle .", "a blue square ."], "images": ["x.png", "y.png"],
             "sentence_ixs": [0, 1], "image_first": [False, True],
             "generate_mode": "generate_images", "num_iter": 1},
            {"sentences": ["a blue"], "images": ["x.png"], "sentence_ixs": [0],
             "image_first": [True], "generate_mode": "generate_texts", "num_iter": 2}]
    (saved / "official_sem.json").write_text(json.dumps(reqs))
    docs = run(saved, "official_sem.json", tmp_path / "o", "--official")
    # request 0: a red circle . [x] [y regenerated] a blue square .
    first = docs[0]
    kinds = [("text" if isinstance(x, str) else "image", g) for x, g in first]
    assert kinds == [("text", False), ("image", False), ("image", True), ("text", False)]
    assert first[3][0] == "a blue square ."
    y = generate.read_generation_requests(saved / "official_sem.json", official=True)[0].items[2]
    assert not torch.equal(first[2][0], y)  # drawn, not copied
    # request 1 with a model that always opens an image: turn 1 opens it, turn 2 draws it
    model = MMInterleaved.from_pretrained(saved / "model")
    with torch.no_grad():
        model.image_tokens.head.bias[0] = 1e4  # the <soi> logit
    model.save_pretrained(tmp_path / "eager")
    docs = generate.main(["--model", str(tmp_path / "eager"), "--input",
                          str(saved / "official_sem.json"), "--out", str(tmp_path / "e"),
                          "--steps", "2", "--official", "--min-new-tokens", "0"])
    second = docs[1]
    assert isinstance(second[-1][0], torch.Tensor) and second[-1][1]  # the drawn image
    plain = generate.main(["--model", str(tmp_path / "eager"), "--input",
                           str(saved / "official_sem.json"), "--out", str(tmp_path / "p"),
                           "--steps", "2", "--max-new-tokens", "3"])
    assert not any(isinstance(x, torch.Tensor) and g for x, g in plain[1])  # never opens one


def test_refuses_unwritable_out_and_bad_numbers_before_loading(saved, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "o"                          # below a regular file
    with pytest.raises(SystemExit) as info:
        run(saved, "ours.json", out)
    assert str(info.value) == (f"generate.py: --out {str(out)!r} cannot be written "
                               f"({str(tmp_path / 'file')!r}: Not a directory); expected a "
                               f"path in a writable directory")
    base = ["--model", "m", "--input", "i", "--out", "o"]
    for flag, value, what in (("--top-p", "2", "in (0, 1], got 2.0"),
                              ("--max-new-tokens", "0", ">= 1, got 0"),
                              ("--steps", "0", ">= 1, got 0"),
                              ("--temperature", "0", "> 0, got 0.0")):
        with pytest.raises(SystemExit) as info:
            generate.parse(base + [flag, value])
        assert info.value.code == 2
        assert capsys.readouterr().err.strip().endswith(f"error: {flag} must be {what}")
    # an --out whose parent directories do not exist yet is created at the end
    (tmp_path / "one.json").write_text(json.dumps([{"items": ["a red"], "generate": "text"}]))
    generate.main(["--model", str(saved / "model"), "--input", str(tmp_path / "one.json"),
                   "--out", str(tmp_path / "new" / "deeper" / "o"), "--max-new-tokens", "1"])
    assert (tmp_path / "new" / "deeper" / "o" / "results.json").is_file()
