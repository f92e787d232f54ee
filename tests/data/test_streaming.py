"""Packing, mixing, rank × worker sharding and resuming of the streaming pipeline."""

from __future__ import annotations

import math
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from mmlayers.data import (
    Document,
    InterleavedCollator,
    InterleavedStream,
    Mixture,
    PackedRow,
    RowPacker,
    ShardedSource,
    StreamingLoader,
    word_level_tokenizer,
)

S, E, SOI, IMG = 1, 2, 4, 5
K = 3  # <image> slots per image


def _reader(num_records: int, images_every: int = 2):
    """A fake reader: record i of shard "name" is a document with a unique word ``{name}x{i}``."""

    def read(path, *, start, select, seed, stats):
        for i in range(start, num_records):
            if select is not None and not select(i):
                continue
            stats["records"] += 1
            items = [f"{path}x{i} w w."]
            for j in range(i % images_every + 1):
                items += [torch.full((3, 2, 2), (j + 1) / 10), f"{path}x{i}"]
            if i % 7 == 3:  # a skipped record, counted
                stats["bad_json"] += 1
                continue
            stats["documents"] += 1
            yield i, Document(items)

    return read


def _tok(shards, n):
    return word_level_tokenizer([f"{s}x{i} w." for s in shards for i in range(n)])


def _enc(ids, soi):
    return SimpleNamespace(ids=ids, no_loss=[False] * len(ids), soi=soi,
                           images=[f"img{p}" for p in soi])


def _doc_tokens(n_text: int, images_at: list[int], start: int = 100):
    """<s>, text tokens with image runs inserted before text index j, </s>."""
    ids, soi, t = [S], [], start
    for j in range(n_text):
        if j in images_at:
            soi.append(len(ids))
            ids += [SOI] + [IMG] * K
        ids.append(t)
        t += 1
    ids.append(E)
    return _enc(ids, soi)


@pytest.mark.parametrize("truncation", ["image", "document"])
def test_packing_keeps_every_token_and_never_cuts_an_image(truncation):
    docs = [_doc_tokens(n, imgs, start=100 * (d + 1)) for d, (n, imgs) in enumerate(
        [(3, [0]), (9, [1, 4, 8]), (2, []), (20, [0, 5, 6, 7, 15]), (1, [0]), (4, [2])])]
    packer = RowPacker(max_length=12, num_image_tokens=K, max_images=2, truncation=truncation)
    rows = list(packer.pack((d, i, i + 1) for i, d in enumerate(docs)))
    flat = [t for r in rows for t in r.input_ids]
    assert flat == [t for d in docs for t in d.ids]  # nothing lost, duplicated or reordered
    assert [img for r in rows for img in r.images] == [i for d in docs for i in d.images]
    for r in rows:
        assert len(r) <= 12 and len(r.images) <= 2
        assert r.soi == [p for p, t in enumerate(r.input_ids) if t == SOI]
        for p in r.soi:  # whole image runs only
            assert r.input_ids[p + 1:p + 1 + K] == [IMG] * K
        assert r.input_ids[0] != IMG
        assert r.opens == [r.input_ids[s] == S for s in r.segments]
    lengths = [len(r) for r in rows]
    if truncation == "image":
        # full rows except where the next image run or the image limit did not allow it
        assert lengths == [11, 12, 12, 11, 10, 12, 11, 9, 7]
    else:
        # a document that does not fit starts the next row; only over-long ones are cut
        assert lengths == [9, 9, 12, 6, 10, 10, 12, 10, 7, 10]
        assert sum(not o for r in rows for o in r.opens) == 5
        assert all(r.opens[1:] == [True] * (len(r.opens) - 1) for r in rows)


@pytest.mark.parametrize("truncation", ["image", "document"])
def test_a_document_that_fills_the_row_exactly_stays_in_it(truncation):
    """8 + 4 tokens in a 12-token row with one image allowed: both fit, to the last token
    and the last image; the next document starts the next row."""
    a, b, c = _doc_tokens(2, [0], start=100), _doc_tokens(2, [], start=200), \
        _doc_tokens(1, [0], start=300)
    assert (len(a.ids), len(b.ids), len(c.ids)) == (8, 4, 7)
    packer = RowPacker(max_length=12, num_image_tokens=K, max_images=1, truncation=truncation)
    rows = list(packer.pack([(a, "before0", "after0"), (b, "before1", "after1"),
                             (c, "before2", "after2")]))
    assert [r.input_ids for r in rows] == [a.ids + b.ids, c.ids]
    assert [r.segments for r in rows] == [[0, 8], [0]]
    assert [r.state for r in rows] == [{"at": "before2", "offset": 0},
                                       {"at": "after2", "offset": 0}]


def test_packing_state_points_at_the_next_token():
    docs = [_doc_tokens(5, [2], start=100), _doc_tokens(6, [0, 3], start=200)]
    rows = list(RowPacker(max_length=8, num_image_tokens=K).pack(
        (d, f"before{i}", f"after{i}") for i, d in enumerate(docs)))
    consumed, stream = 0, [t for d in docs for t in d.ids]
    for r in rows:
        consumed += len(r)
        at, offset = r.state["at"], r.state["offset"]
        doc = int(at[-1]) + (at.startswith("after"))
        assert consumed == sum(len(d.ids) for d in docs[:doc]) + offset
    assert consumed == len(stream)
    # resuming from a row's state with the same documents gives the remaining rows
    state = rows[1].state
    again = list(RowPacker(max_length=8, num_image_tokens=K).pack(
        [(docs[int(state["at"][-1])], None, "end")] + ([(docs[1], None, "end")]
                                                       if state["at"] == "before0" else []),
        offset=state["offset"]))
    assert [r.input_ids for r in again] == [r.input_ids for r in rows[2:]]


def test_collator_takes_packed_rows():
    tok = word_level_tokenizer(["a b c d e."])
    collate = InterleavedCollator(tokenizer=tok, num_image_tokens=2, max_length=8)
    img = torch.zeros(3, 2, 2)
    docs = [Document(["a b", img, "c"]), Document([img, "d e."])]
    packer = RowPacker(max_length=8, num_image_tokens=2)
    rows = list(packer.pack((collate.encode(d), None, None) for d in docs))
    batch = collate(rows)
    assert [tok.convert_ids_to_tokens(r) for r in batch.input_ids.tolist()] == [
        ["<s>", "a", "b", "<soi>", "<image>", "<image>", "c", "</s>"],
        ["<s>", "<soi>", "<image>", "<image>", "d", "e", ".", "</s>"]]
    assert batch.image_bos.tolist() == [0, 0] and batch.image_soi.tolist() == [3, 1]
    assert batch.image_has_context.tolist() == [True, False]
    assert batch.row_documents == [[0], [1]]
    # a continuation row (no <s>): its image has context if text precedes it in the row
    cont = PackedRow(input_ids=[7, 8, collate.soi_id, collate.image_id, collate.image_id, 2],
                     no_loss=[False] * 6, images=[img], soi=[2], segments=[0], opens=[False])
    b = collate([cont])
    assert b.image_has_context.tolist() == [True] and b.image_previous.tolist() == [-1]
    assert b.labels[0].tolist() == [-100, 8, 4, -100, -100, 2]


def test_mixing_proportions_and_determinism():
    def endless(path, *, start, select, seed, stats):
        i = start
        while True:
            yield i, path
            i += 1

    probs = [1, 1, 1, 2]
    sources = [ShardedSource([n], endless, name=n, epochs=None) for n in "abcd"]
    mix = Mixture(sources, probs, seed=3)
    it = mix.iterate(0, 1)
    draws = 6000
    got = Counter(next(it)[0] for _ in range(draws))
    for name, p in zip("abcd", probs, strict=True):
        q = p / sum(probs)
        assert abs(got[name] - draws * q) < 4 * math.sqrt(draws * q * (1 - q)), got
    first = [d for d, _ in zip((x for x, _ in Mixture(sources, probs, seed=3).iterate(0, 1)),
                               range(50), strict=False)]
    again = [d for d, _ in zip((x for x, _ in Mixture(sources, probs, seed=3).iterate(0, 1)),
                               range(50), strict=False)]
    other = [d for d, _ in zip((x for x, _ in Mixture(sources, probs, seed=4).iterate(0, 1)),
                               range(50), strict=False)]
    assert first == again and first != other
    # resuming from a position continues the same sequence
    it = Mixture(sources, probs, seed=3).iterate(0, 1)
    pos = [next(it) for _ in range(20)][-1][1]
    rest = [x for x, _ in zip((d for d, _ in Mixture(sources, probs, seed=3).iterate(0, 1, pos)),
                              range(30), strict=False)]
    assert rest == first[20:50]


def _unique_words(batches, tok):
    vocab = tok.convert_ids_to_tokens
    return Counter(w for b in batches for w in vocab(b.input_ids[b.attention_mask.bool()])
                   if re.fullmatch(r"s\d+x\d+", w))


@pytest.mark.parametrize("num_shards", [8, 3])
def test_every_sample_once_across_two_ranks_and_two_workers(num_shards):
    shards = [f"s{j}" for j in range(num_shards)]
    n = 6
    tok = _tok(shards, n)
    collate = InterleavedCollator(tokenizer=tok, num_image_tokens=K, max_length=64)
    seen = Counter()
    for rank in range(2):
        stream = InterleavedStream(ShardedSource(shards, _reader(n), seed=1), collate,
                                   batch_size=2, truncation="document", rank=rank, world_size=2)
        loader = StreamingLoader(stream, num_workers=2)
        batches = list(loader)
        slots = {b.data_state["slot"] for b in batches}
        assert slots == {2 * rank, 2 * rank + 1} if num_shards == 8 else slots <= {2 * rank, 2 * rank + 1}
        seen += _unique_words(batches, tok)
        stats = loader.stats()["data"]
        assert stats["records"] == stats["documents"] + stats["bad_json"]
    # each kept record exactly once: its word is once in its text + once per image
    expected = Counter({f"{s}x{i}": 2 + i % 2 for s in shards for i in range(n) if i % 7 != 3})
    assert seen == expected


def test_resume_continues_the_stream_with_workers():
    shards = [f"s{j}" for j in range(4)]
    n = 5
    tok = _tok(shards, n)
    collate = InterleavedCollator(tokenizer=tok, num_image_tokens=K, max_length=20)

    def stream():
        mix = Mixture([ShardedSource(shards[:2], _reader(n), name="x", seed=0),
                       ShardedSource(shards[2:], _reader(n), name="y", seed=0)], [1, 2], seed=5)
        return InterleavedStream(mix, collate, batch_size=2, max_images=2)

    full_loader = StreamingLoader(stream(), num_workers=2)
    full = list(full_loader)
    assert any(b.data_state["offset"] > 0 for b in full)  # rows end inside documents
    loader = StreamingLoader(stream(), num_workers=2)
    head = []
    for b in loader:
        head.append(b)
        if len(head) == 5:
            break
    state = loader.state_dict()
    resumed = StreamingLoader(stream(), num_workers=2)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.images, b.images)
    totals = {k: dict(v) for k, v in full_loader.stats().items()}
    assert {k: dict(v) for k, v in resumed.stats().items()} == totals  # counts continue
    assert totals["x"]["bad_json"] > 0


def test_resume_in_process_and_slot_mismatch():
    shards = ["a", "b"]
    tok = _tok(shards, 6)
    collate = InterleavedCollator(tokenizer=tok, num_image_tokens=K, max_length=16)

    def make(**kw):
        return InterleavedStream(ShardedSource(shards, _reader(6), shuffle=False), collate,
                                 batch_size=1, **kw)

    full = [b.input_ids for b in make()]
    s = make()
    it = iter(s)
    head = [next(it).input_ids for _ in range(4)]
    state = s.state_dict()
    t = make()
    t.load_state_dict(state)
    assert [x.tolist() for x in head + [b.input_ids for b in t]] == [x.tolist() for x in full]
    u = make(rank=0, world_size=2)
    u.load_state_dict(state)
    with pytest.raises(ValueError, match="1 slots"):
        next(iter(u))


def test_endless_source_resumed_at_an_epoch_end_goes_on():
    src = ShardedSource(["a", "b"], _reader(3), shuffle=False, epochs=None)
    it = src.iterate(0, 1)
    head = [next(it) for _ in range(6)]  # records 0, 1, 2 (bad: 3 ≥ n) of a and b
    assert head[-1][1] == {"round": 0, "epoch": 0, "shard": 1, "record": 3}
    more = [d.texts[0] for d, _ in zip((d for d, _ in src.iterate(0, 1, head[-1][1])),
                                       range(3), strict=False)]
    assert [(t.split()[0]) for t in more] == ["ax0", "ax1", "ax2"]  # epoch 1 starts over


def test_streaming_loader_refuses_persistent_workers():
    tok = _tok(["a"], 2)
    collate = InterleavedCollator(tokenizer=tok, num_image_tokens=K, max_length=16)
    stream = InterleavedStream(ShardedSource(["a"], _reader(2)), collate, batch_size=1)
    with pytest.raises(ValueError, match="persistent_workers=True"):
        StreamingLoader(stream, num_workers=1, persistent_workers=True)
    with pytest.raises(TypeError, match="InterleavedStream"):
        StreamingLoader([1, 2])
