"""clip_similarity on a tiny random CLIP (plumbing: pairing, batching, normalisation)."""

from __future__ import annotations

import json

import pytest
import torch

from mmlayers.evaluation.clip_similarity import clip_similarity

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    proc = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32, bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    return transformers.CLIPModel(cfg).eval(), proc


def _images(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).byte().numpy())
            for _ in range(n)]


def _unit(out):
    feats = out if torch.is_tensor(out) else out.pooler_output
    return feats[0] / feats[0].norm()


def test_pairs_match_one_by_one_computation(clip):
    model, proc = clip
    images, refs = _images(0, 5), _images(1, 5)
    texts = ["a red circle", "a blue square", "green", "left", "right"]
    got = clip_similarity(model, proc, images, texts=texts, references=refs, batch_size=2)
    want_t, want_i = [], []
    with torch.no_grad():
        for img, text, ref in zip(images, texts, refs, strict=True):
            px = proc(images=[img], return_tensors="pt")["pixel_values"]
            tk = proc(text=[text], return_tensors="pt")
            f = _unit(model.get_image_features(pixel_values=px))
            t = _unit(model.get_text_features(input_ids=tk["input_ids"],
                                              attention_mask=tk["attention_mask"]))
            r = _unit(model.get_image_features(
                pixel_values=proc(images=[ref], return_tensors="pt")["pixel_values"]))
            want_t.append(float(f @ t))
            want_i.append(float(f @ r))
    assert got["clip_text_image"] == pytest.approx(sum(want_t) / 5, rel=1e-5)
    assert got["clip_image_image"] == pytest.approx(sum(want_i) / 5, rel=1e-5)
    same = clip_similarity(model, proc, images, references=images)
    assert same == {"clip_image_image": pytest.approx(1.0, abs=1e-5)}


def test_bad_pairings(clip):
    model, proc = clip
    with pytest.raises(ValueError, match="texts= or references="):
        clip_similarity(model, proc, _images(0, 2))
    with pytest.raises(ValueError, match="one entry per image"):
        clip_similarity(model, proc, _images(0, 2), texts=["a"])
