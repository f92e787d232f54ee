"""recipes/evaluate.py on a tiny generated dataset with a tiny saved model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

import evaluate  # noqa: E402

from mmlayers.data import to_pil, word_level_tokenizer  # noqa: E402
from mmlayers.evaluation import (  # noqa: E402
    bleu,
    cider_d,
    extract_vqa_answer,
    ndcg,
    vqa_accuracy,
)
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
    for task in ("coco_caption", "vqav2", "image2paragraph"):
        (data / task / "images").mkdir(parents=True)
        for i in range(3):
            to_pil(torch.rand(3, 32, 32, generator=g)).save(data / task / "images" / f"{i}.png")
    caps = [{"id": i, "image": f"images/{i}.png",
             "references": ["a red circle on the left .", "a red circle", "the red circle"]}
            for i in range(3)]
    vqa = [{"id": 10 + i, "image": f"images/{i}.png", "question": "what colour is it ?",
            "answers": ["red"] * 6 + ["blue"] * 4} for i in range(3)]
    t2i = [{"id": i, "caption": "a blue square on the right .", "image": f"images/{i}.png"}
           for i in range(2)]
    (data / "coco_t2i" / "images").mkdir(parents=True)
    for i in range(2):
        to_pil(torch.rand(3, 32, 32, generator=g)).save(data / "coco_t2i" / "images" / f"{i}.png")
    save_tiny_clip(root / "clip")
    vd = [{"id": i, "image": f"../vqav2/images/{i}.png", "caption": "a red circle",
           "dialog": [["is it red", "yes"], ["is it left", "no"], ["what colour is it", "red"]],
           "round": 3, "options": ["red", "blue", "a green square", "left"],
           "relevance": [1.0, 0.0, 0.5, 0.0]} for i in range(2)]
    for task, items in (("coco_caption", caps), ("vqav2", vqa), ("coco_t2i", t2i),
                        ("visdial", vd), ("image2paragraph", caps[:2])):
        (data / task).mkdir(exist_ok=True)
        (data / task / "annotations.json").write_text(json.dumps({"task": task, "items": items}))
    return root


def save_tiny_clip(path):
    """A random-init CLIP with a character-level tokenizer, saved like a real one."""
    import transformers

    path.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok).save_pretrained(path)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8)
    transformers.CLIPModel(cfg).save_pretrained(path)


def run(setup, out, tasks="coco_caption,vqav2,coco_t2i,visdial", *extra):
    return evaluate.main(["--model", str(setup / "model"), "--tasks", tasks,
                          "--data-root", str(setup / "data"), "--out", str(out),
                          "--max-new-tokens", "3", "--num-beams", "1", "--steps", "2", *extra])


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
    assert set(t["coco_t2i"]["skipped"]) == {"FID", "CLIP score", "CLIP rerank"}
    assert all(Path(p).is_file() for p in t["coco_t2i"]["predictions"].values())
    vd = t["visdial"]
    assert all(len(p) == 4 for p in vd["predictions"].values())
    assert vd["scores"]["NDCG"] == pytest.approx(
        ndcg(list(vd["predictions"].values()), [[1.0, 0.0, 0.5, 0.0]] * 2))
    from PIL import Image

    from mmlayers.evaluation import option_log_likelihoods, visdial_prompt
    model = MMInterleaved.from_pretrained(setup / "model", train_policy=False).eval()
    context, _ = visdial_prompt("a red circle", [["is it red", "yes"], ["is it left", "no"],
                                                  ["what colour is it", "red"]], 3)
    image = Image.open(setup / "data" / "vqav2" / "images" / "0.png").convert("RGB")
    want = option_log_likelihoods(model, [image, context], ["red", "blue", "a green square",
                                                             "left"])
    assert vd["predictions"]["0"] == pytest.approx(want.tolist(), rel=1e-5)
    assert "| coco_caption | 3 |" in (tmp_path / "results.md").read_text()

    # Resume: nothing is generated again; drop one cached prediction and only it is redone.
    again = run(setup, tmp_path, "coco_caption")["tasks"]["coco_caption"]
    assert again["generated_now"] == 0 and again["scores"] == cap["scores"]
    cache = tmp_path / "coco_caption" / "predictions.jsonl"
    cache.write_text("".join(cache.read_text().splitlines(keepends=True)[:2]))
    again = run(setup, tmp_path, "coco_caption")["tasks"]["coco_caption"]
    assert again["generated_now"] == 1 and again["predictions"] == cap["predictions"]


def test_clip_scores_of_generated_images(setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from mmlayers.evaluation import clip_similarity

    t2i = run(setup, tmp_path, "coco_t2i", "--clip", str(setup / "clip"))["tasks"]["coco_t2i"]
    assert "CLIP score" not in t2i["skipped"]
    ids = sorted(t2i["predictions"], key=int)
    want = clip_similarity(
        transformers.CLIPModel.from_pretrained(setup / "clip").eval(),
        transformers.CLIPProcessor.from_pretrained(setup / "clip"),
        [Image.open(t2i["predictions"][i]).convert("RGB") for i in ids],
        texts=["a blue square on the right ."] * 2,
        references=[Image.open(setup / "data" / "coco_t2i" / "images" / f"{i}.png")
                    .convert("RGB") for i in ids])
    assert t2i["scores"]["clip_text_image"] == pytest.approx(want["clip_text_image"])
    assert t2i["scores"]["clip_image_image"] == pytest.approx(want["clip_image_image"])

    # Rerank: of the images seeded 0 and 1 (what --seed 0 and --seed 1 draw alone), the
    # one closer to its caption is kept.
    model = transformers.CLIPModel.from_pretrained(setup / "clip").eval()
    proc = transformers.CLIPProcessor.from_pretrained(setup / "clip")
    alone = [run(setup, tmp_path / f"seed{k}", "coco_t2i", "--seed", str(k),
                 "--candidates", "1", "--clip", str(setup / "clip"))["tasks"]["coco_t2i"]
             for k in (0, 1)]
    both = run(setup, tmp_path / "both", "coco_t2i", "--candidates", "2",
               "--clip", str(setup / "clip"))["tasks"]["coco_t2i"]
    assert "CLIP rerank" not in both["skipped"]
    for i in ids:
        cands = [Image.open(a["predictions"][i]).convert("RGB") for a in alone]
        sims = [clip_similarity(model, proc, [c], texts=["a blue square on the right ."])
                ["clip_text_image"] for c in cands]
        assert sims[0] != sims[1]
        best = cands[max(range(2), key=sims.__getitem__)]
        assert Image.open(both["predictions"][i]).convert("RGB").tobytes() == best.tobytes()


def test_two_processes_equal_one(setup, tmp_path, monkeypatch):
    """Items are split over 2 CPU processes (gloo), gathered and scored once by rank 0."""
    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tasks = "coco_caption,vqav2,coco_t2i"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "recipes" / "configs" / "accelerate_cpu_2proc.yaml"),
           "--main_process_port", str(port), str(root / "recipes" / "evaluate.py"),
           "--model", str(setup / "model"), "--tasks", tasks, "--data-root",
           str(setup / "data"), "--out", str(tmp_path / "two"), "--max-new-tokens", "3",
           "--num-beams", "1", "--steps", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["tasks"]
    monkeypatch.setattr(evaluate, "meteor", lambda c, r: (None, "test: METEOR not run"))
    one = run(setup, tmp_path / "one", tasks)["tasks"]
    # Both processes generated: each wrote its own share of the predictions.
    shares = [len((tmp_path / "two" / "coco_caption" / f"predictions.rank{r}.jsonl")
                  .read_text().splitlines()) for r in (0, 1)]
    assert shares == [2, 1] and two["coco_caption"]["processes"] == 2
    for task in ("coco_caption", "vqav2"):
        assert two[task]["predictions"] == one[task]["predictions"]
        for k, v in one[task]["scores"].items():
            assert two[task]["scores"][k] == pytest.approx(v, rel=1e-12), (task, k)
    # Generated images are the same pixels whichever process drew them.
    from PIL import Image
    for i, path in one["coco_t2i"]["predictions"].items():
        a = Image.open(path).tobytes()
        b = Image.open(two["coco_t2i"]["predictions"][i]).tobytes()
        assert a == b, i


def test_official_beam_search_runs(setup, tmp_path, monkeypatch):
    """Image2Paragraph's official decoding (5 beams, repetition penalty 1.2) runs as beam
    search without the penalty, which the session's beam search does not have."""
    monkeypatch.setattr(evaluate, "meteor", lambda c, r: (None, "test: METEOR not run"))
    report = evaluate.main(["--model", str(setup / "model"), "--tasks", "image2paragraph",
                            "--data-root", str(setup / "data"), "--out", str(tmp_path),
                            "--max-new-tokens", "3"])
    para = report["tasks"]["image2paragraph"]
    assert para["settings"]["text"]["num_beams"] == 5 and para["items"] == 2
    assert "repetition_penalty" in para["settings"]["beam_search_ignores"]


def test_bad_inputs_are_named(setup, tmp_path):
    with pytest.raises(ValueError, match="known tasks"):
        run(setup, tmp_path, "coco_caption,gqa")
    with pytest.raises(FileNotFoundError, match="okvqa.*annotations.json not found"):
        run(setup, tmp_path, "okvqa")
    with pytest.raises(ValueError, match="no config.json"):
        evaluate.main(["--model", str(tmp_path), "--tasks", "vqav2", "--data-root",
                       str(setup / "data"), "--out", str(tmp_path / "o")])
