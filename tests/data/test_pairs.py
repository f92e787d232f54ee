"""Image-text pairs from tar shards: grouping by key, caption placement, counted skips."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from mmlayers.data import (
    InterleavedCollator,
    PairReader,
    ReadStats,
    tar_samples,
    word_level_tokenizer,
)


def _png(rgb, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), rgb).save(buf, fmt)
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _shard(path):
    return _tar(path, [
        ("000.png", _png((255, 0, 0))), ("000.txt", b"A  Red\nSquare"),       # 0 kept
        ("001.txt", b"no image here"),                                       # 1 missing_image
        ("002.jpg", _png((0, 255, 0), "JPEG")), ("002.json", json.dumps(
            {"caption": "Green"}).encode()),                                  # 2 kept (json)
        ("003.png", b"\x89PNG broken"), ("003.txt", b"broken"),              # 3 unreadable
        ("004.png", _png((0, 0, 255))),                                      # 4 missing_caption
        ("005.png", _png((0, 0, 255))), ("005.txt", "Bleu é".encode()),      # 5 kept
        ("sub/006.webp", _png((9, 9, 9), "WEBP")), ("sub/006.txt", b"  "),   # 6 missing_caption
    ])


def test_samples_are_grouped_by_key(tmp_path):
    path = _shard(tmp_path / "p.tar")
    got = [(i, k, sorted(s)) for i, k, s in tar_samples(path)]
    assert got == [(0, "000", ["png", "txt"]), (1, "001", ["txt"]), (2, "002", ["jpg", "json"]),
                   (3, "003", ["png", "txt"]), (4, "004", ["png"]), (5, "005", ["png", "txt"]),
                   (6, "sub/006", ["txt", "webp"])]
    assert [i for i, _, _ in tar_samples(path, start=3, select=lambda i: i % 2 == 1)] == [3, 5]


def test_pairs_skips_are_counted_and_do_not_shift(tmp_path):
    path = _shard(tmp_path / "p.tar")
    stats = ReadStats()
    out = list(PairReader(image_size=4, caption_first_prob=1.0)(path, stats=stats))
    assert [i for i, _ in out] == [0, 2, 5]
    docs = [d for _, d in out]
    assert [d.items[0] for d in docs] == ["a red square", "green", "bleu é"]
    assert [d.meta["source"] for d in docs] == ["p.tar:000", "p.tar:002", "p.tar:005"]
    red = docs[0].items[1]
    assert red.shape == (3, 4, 4) and torch.allclose(red[:, 0, 0], torch.tensor([1.0, 0, 0]))
    assert dict(stats) == {"records": 7, "documents": 3, "images": 3, "missing_image": 1,
                           "unreadable_image": 1, "missing_caption": 2}


def test_caption_placement_and_loss(tmp_path):
    path = _tar(tmp_path / "many.tar", [x for i in range(300) for x in (
        (f"{i:04d}.png", _png((i % 256, 0, 0))), (f"{i:04d}.txt", b"a red square"))])
    docs = PairReader(image_size=2)(path)
    first = [d.caption_first for _, d in docs]
    assert all(isinstance(d.items[0], str) == d.caption_first for _, d in PairReader(
        image_size=2)(path))
    assert abs(sum(first) - 150) <= 4 * 75 ** 0.5  # binomial(300, 0.5)
    trained = next(d for _, d in PairReader(image_size=2, caption_first_prob=1.0,
                                            train_caption_first=True)(path))
    assert isinstance(trained.items[0], str) and trained.caption_first is False
    after = next(d for _, d in PairReader(image_size=2, caption_first_prob=0.0,
                                          lowercase=False)(path))
    assert isinstance(after.items[0], torch.Tensor) and after.items[1] == "a red square"
    # collated: a caption placed first gets no text loss, its <soi> does
    tok = word_level_tokenizer(["a red square"])
    collate = InterleavedCollator(tokenizer=tok, num_image_tokens=2, max_length=16)
    doc = next(d for _, d in PairReader(image_size=2, caption_first_prob=1.0)(path))
    labels = collate([doc]).labels[0].tolist()
    assert labels == [-100, -100, -100, -100, tok.convert_tokens_to_ids("<soi>"), -100, -100, 2]


def test_truncated_tar_keeps_what_it_read(tmp_path):
    path = _tar(tmp_path / "t.tar", [x for i in range(4) for x in (
        (f"{i}.png", _png((0, 0, 0))), (f"{i}.txt", b"black"))])
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    stats = ReadStats()
    got = [i for i, _ in PairReader(image_size=2)(cut, stats=stats)]
    assert got == list(range(len(got))) and 0 < len(got) < 4
    assert stats["unreadable_shard"] == 1
    assert list(PairReader()(tmp_path / "absent.tar", stats=stats)) == []
    assert stats["unreadable_shard"] == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="caption_first_prob"):
        PairReader(caption_first_prob=-0.1)
