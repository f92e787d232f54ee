"""recipes/evaluate.py on a tiny generated dataset with a tiny saved model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

import evaluate  # noqa: E402

from mmlayers.data import to_pil, word_level_tokenizer  # noqa: E402
from mmlayers.evaluation import bleu, cider_d, extract_vqa_answer, vqa_accuracy  # noqa: E402
from mmlayers.models import MMInterleaved, MMInterleavedConfig  # noqa: E402

WORDS = ("a red green blue circle square on the left right . photo of based image please "
         "answer question , what colour is it ? provide an accurate within one word "
         "answer: the")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = word_level_tokenizer([WORDS])
    cfg = MMInterleavedConfig.tiny(vocab_size=len(tok))
    cfg.llm.config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    cfg.vision.num_tokens, cfg.vision.resampler_depth = 4, 1
    cfg.decoder.unet.update(block_out_channels=[16, 32, 32], cross_attention_dim=32,
                            attention_head_dim=4)
    cfg.decoder.context_hidden, cfg.decoder.context_queries = 32, 6
    torch.manual_seed(0)
    MMInterleaved.from_config(cfg, tokenizer=tok).save_pretrained(root / "model")
    data = root / "data"
    g = torch.Generator().manual_seed(0)
    for task in ("coco_caption", "vqav2"):
        (data / task / "images").mkdir(parents=True)
        for i in range(3):
            to_pil(torch.rand(3, 32, 32, generator=g)).save(data / task / "images" / f"{i}.png")
    caps = [{"id": i, "image": f"images/{i}.png",
             "references": ["a red circle on the left .", "a red circle", "the red circle"]}
            for i in range(3)]
    vqa = [{"id": 10 + i, "image": f"images/{i}.png", "question": "what colour is it ?",
            "answers": ["red"] * 6 + ["blue"] * 4} for i in range(3)]
    t2i = [{"id": i, "caption": "a blue square on the right ."} for i in range(2)]
    for task, items in (("coco_caption", caps), ("vqav2", vqa), ("coco_t2i", t2i)):
        (data / task).mkdir(exist_ok=True)
        (data / task / "annotations.json").write_text(json.dumps({"task": task, "items": items}))
    return root


def run(setup, out, tasks="coco_caption,vqav2,coco_t2i,visdial"):
    return evaluate.main(["--model", str(setup / "model"), "--tasks", tasks,
                          "--data-root", str(setup / "data"), "--out", str(out),
                          "--max-new-tokens", "3", "--num-beams", "1", "--steps", "2"])


def test_scores_skips_and_resume(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "meteor", lambda c, r: (None, "test: METEOR not run"))
    report = run(setup, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == report
    t = report["tasks"]
    cap = t["coco_caption"]
    refs = {str(i): ["a red circle on the left .", "a red circle", "the red circle"]
            for i in range(3)}
    assert cap["generated_now"] == 3
    assert cap["scores"]["CIDEr-D"] == cider_d(cap["predictions"], refs)
    assert cap["scores"]["BLEU-4"] == bleu(cap["predictions"], refs)
    assert cap["skipped"]["METEOR"] == "test: METEOR not run" and "SPICE" in cap["skipped"]
    vqa = t["vqav2"]
    want = sum(vqa_accuracy(extract_vqa_answer(p), ["red"] * 6 + ["blue"] * 4)
               for p in vqa["predictions"].values()) / 3
    assert vqa["scores"]["VQA accuracy"] == pytest.approx(want)
    assert set(t["coco_t2i"]["skipped"]) == {"FID", "CLIP score"}
    assert all(Path(p).is_file() for p in t["coco_t2i"]["predictions"].values())
    assert "NDCG" in t["visdial"]["skipped"]
    assert "| coco_caption | 3 |" in (tmp_path / "results.md").read_text()

    # Resume: nothing is generated again; drop one cached prediction and only it is redone.
    again = run(setup, tmp_path, "coco_caption")["tasks"]["coco_caption"]
    assert again["generated_now"] == 0 and again["scores"] == cap["scores"]
    cache = tmp_path / "coco_caption" / "predictions.jsonl"
    cache.write_text("".join(cache.read_text().splitlines(keepends=True)[:2]))
    again = run(setup, tmp_path, "coco_caption")["tasks"]["coco_caption"]
    assert again["generated_now"] == 1 and again["predictions"] == cap["predictions"]


def test_bad_inputs_are_named(setup, tmp_path):
    with pytest.raises(ValueError, match="known tasks"):
        run(setup, tmp_path, "coco_caption,gqa")
    with pytest.raises(FileNotFoundError, match="okvqa.*annotations.json not found"):
        run(setup, tmp_path, "okvqa")
    with pytest.raises(ValueError, match="no config.json"):
        evaluate.main(["--model", str(tmp_path), "--tasks", "vqav2", "--data-root",
                       str(setup / "data"), "--out", str(tmp_path / "o")])
