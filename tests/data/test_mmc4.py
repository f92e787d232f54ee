"""MMC4 reader: the paper's filtering, placement, determinism, counted skips."""

from __future__ import annotations

import gzip
import json
import zipfile

import pytest
from PIL import Image

from mmlayers.data import MMC4Reader, ReadStats, ShardedSource

COLORS = {"r": (255, 0, 0), "g": (0, 255, 0), "b": (0, 0, 255), "w": (255, 255, 255)}


def _images(root):
    for name, rgb in COLORS.items():
        Image.new("RGB", (8, 8), rgb).save(root / f"{name}.png")
    (root / "broken.png").write_bytes(b"this is not a png")


def _line(texts, images):
    return json.dumps({"text_list": texts, "image_info": [
        {"image_name": n, "matched_text_index": j, "matched_sim": s} for n, j, s in images]})


def _colour(t):
    """The COLORS key of a solid image tensor."""
    rgb = tuple(round(float(v) * 255) for v in t[:, 0, 0])
    return next(k for k, v in COLORS.items() if v == rgb)


def _layout(doc):
    return [x if isinstance(x, str) else _colour(x) for x in doc.items]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_similarity_threshold_and_placement(tmp_path):
    _images(tmp_path)
    shard = _write(tmp_path / "docs_0.jsonl", [_line(
        ["Zero.", "One.", "Two."],
        [("r.png", 2, 0.30), ("g.png", 0, 0.23), ("b.png", 1, 0.24)])])
    first = MMC4Reader(tmp_path, image_size=4, image_first_prob=1.0).read(shard)
    after = MMC4Reader(tmp_path, image_size=4, image_first_prob=0.0).read(shard)
    # g (0.23 < 0.24) is dropped; the rest follow their sentence order, not the list order
    assert _layout(first[0]) == ["Zero.", "b", "One.", "r", "Two."]
    assert _layout(after[0]) == ["Zero. One.", "b", "Two.", "r"]
    assert first[0].meta == {"image_names": ["b.png", "r.png"], "source": "docs_0.jsonl:0"}
    stats = ReadStats()
    MMC4Reader(tmp_path, sim_threshold=0.3, single_image_keep=1.0).read(shard, stats=stats)
    assert stats["low_similarity"] == 2 and stats["images"] == 1


def test_max_images_keeps_a_random_subset_in_sentence_order(tmp_path):
    _images(tmp_path)
    imgs = [(f"{c}.png", j, 0.5) for j, c in enumerate("rgbwrgbw")]
    shard = _write(tmp_path / "s.jsonl", [_line([f"S{j}." for j in range(8)], imgs)] * 40)
    stats = ReadStats()
    docs = MMC4Reader(tmp_path, max_images=3, image_size=2, image_first_prob=0.0).read(
        shard, stats=stats)
    assert len(docs) == 40 and stats["extra_images"] == 40 * 5 and stats["images"] == 120
    subsets = set()
    for doc in docs:
        layout = _layout(doc)
        assert sum(1 for x in layout if len(x) == 1) == 3
        # an image directly follows its sentence: the text item before it ends with S{j}.
        placed = [int(layout[i - 1].split()[-1][1]) for i, x in enumerate(layout) if len(x) == 1]
        assert placed == sorted(placed) and len(set(placed)) == 3
        assert [x for x in layout if len(x) == 1] == ["rgbwrgbw"[j] for j in placed]
        subsets.add(tuple(placed))
    assert len(subsets) > 10  # the kept subset is drawn per document, not fixed


def test_single_image_share_and_determinism(tmp_path):
    _images(tmp_path)
    shard = _write(tmp_path / "one.jsonl", [_line(["A."], [("r.png", 0, 0.9)])] * 400)
    stats = ReadStats()
    reader = MMC4Reader(tmp_path, image_size=2)  # the paper's defaults: keep half
    kept = [i for i, _ in reader(shard, stats=stats)]
    # binomial(400, 0.5): 200 ± 10; 4 sigma
    assert 160 <= len(kept) <= 240
    assert stats["single_image_dropped"] == 400 - len(kept) and stats["documents"] == len(kept)
    assert [i for i, _ in reader(shard)] == kept  # same seed, same records
    assert [i for i, _ in MMC4Reader(tmp_path, image_size=2, seed=1)(shard)] != kept
    # image before / after its sentence: half and half over the kept documents
    before = sum(1 for _, d in reader(shard) if not isinstance(d.items[0], str))
    assert abs(before - len(kept) / 2) <= 4 * (len(kept) / 4) ** 0.5


def test_bad_records_are_skipped_counted_and_do_not_shift_the_data(tmp_path):
    _images(tmp_path)
    good = _line(["Good.", "Two."], [("r.png", 0, 0.5), ("b.png", 1, 0.5)])
    lines = [
        good,                                                    # 0 kept
        "{not json",                                             # 1 bad_json
        json.dumps([1, 2]),                                      # 2 bad_record
        json.dumps({"text_list": "x", "image_info": []}),        # 3 bad_record
        _line(["Lost."], [("missing.png", 0, 0.9)]),             # 4 missing_image → no_image
        _line(["Broken."], [("broken.png", 0, 0.9)]),            # 5 unreadable → no_image
        _line(["Idx."], [("r.png", 7, 0.9), ("g.png", 0, 0.9), ("w.png", 0, 0.9)]),  # 6 kept
        "",                                                      # 7 blank: ignored
        good,                                                    # 8 kept
    ]
    shard = _write(tmp_path / "bad.jsonl", lines)
    stats = ReadStats()
    out = list(MMC4Reader(tmp_path, image_size=2)(shard, stats=stats))
    assert [i for i, _ in out] == [0, 6, 8]
    assert [d.meta["source"] for _, d in out] == ["bad.jsonl:0", "bad.jsonl:6", "bad.jsonl:8"]
    assert dict(stats) == {"records": 8, "documents": 3, "images": 6, "bad_json": 1,
                           "bad_record": 2, "missing_image": 1, "unreadable_image": 1,
                           "no_image": 2, "bad_image_info": 1}
    assert stats.skipped == 5
    # resuming inside a shard: records from `start` on, same documents
    assert [i for i, _ in MMC4Reader(tmp_path, image_size=2)(shard, start=6)] == [6, 8]
    missing = ReadStats()
    assert list(MMC4Reader(tmp_path)(tmp_path / "nope.jsonl", stats=missing)) == []
    assert missing == {"unreadable_shard": 1}


def test_sharded_source_over_mmc4_files(tmp_path):
    _images(tmp_path)
    shards = [_write(tmp_path / f"d{k}.jsonl", [
        _line([f"Doc {k} {i}."], [("r.png", 0, 0.9), ("g.png", 0, 0.9)]) for i in range(3)])
        for k in range(4)]
    src = ShardedSource(shards, MMC4Reader(tmp_path, image_size=2), name="mmc4", seed=0)
    stats = {}
    seen = [d.meta["source"] for slot in range(2) for d, _ in src.iterate(slot, 2, stats=stats)]
    assert sorted(seen) == sorted(f"d{k}.jsonl:{i}" for k in range(4) for i in range(3))
    assert stats["mmc4"]["documents"] == 12


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_root"):
        MMC4Reader(tmp_path / "absent")
    with pytest.raises(ValueError, match="single_image_keep"):
        MMC4Reader(tmp_path, single_image_keep=1.5)
    with pytest.raises(ValueError, match="max_images"):
        MMC4Reader(tmp_path, max_images=0)


def test_gzip_and_zip_shards_read_like_plain_ones(tmp_path):
    _images(tmp_path)
    lines = [_line([f"Doc {i}.", "More."], [("r.png", 0, 0.5), ("b.png", 1, 0.5)])
             for i in range(30)]
    plain = _write(tmp_path / "d.jsonl", lines)
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    zipped = tmp_path / "d.jsonl.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(plain, "d.jsonl")
    reader = MMC4Reader(tmp_path, image_size=2)
    want = [(i, _layout(d)) for i, d in reader(plain)]
    assert len(want) == 30
    for path in (gz, zipped):
        assert [(i, _layout(d)) for i, d in reader(path)] == want
    # a gzip cut short: the lines before the cut, then one unreadable_shard
    cut = tmp_path / "cut.jsonl.gz"
    data = gz.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    stats = ReadStats()
    got = [i for i, _ in reader(cut, stats=stats)]
    assert 0 < len(got) < 30 and got == list(range(len(got)))
    assert stats["unreadable_shard"] == 1 and stats["bad_json"] <= 1
    bad = tmp_path / "two.jsonl.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("a.jsonl", lines[0])
        z.writestr("b.jsonl", lines[1])
    stats = ReadStats()
    assert list(reader(bad, stats=stats)) == [] and stats == {"unreadable_shard": 1}


def test_a_failing_transform_surfaces_unless_the_file_is_unreadable(tmp_path):
    """The user's transform: an OSError (the file cannot be read) is a counted skip; any
    other exception is a bug in the transform and reaches the caller."""
    _images(tmp_path)
    shard = _write(tmp_path / "docs_0.jsonl", [_line(["One.", "Two."], [("r.png", 0, 0.9),
                                                                        ("g.png", 1, 0.9)])])

    def buggy(path):
        raise KeyError("no such field")

    stats = ReadStats()
    with pytest.raises(KeyError, match="no such field") as info:
        MMC4Reader(tmp_path, transform=buggy).read(shard, stats=stats)
    assert "transform on" in info.value.__notes__[0] and "r.png" in info.value.__notes__[0]
    assert stats["unreadable_image"] == 0

    def unreadable(path):
        if path.endswith("r.png"):
            raise OSError("cannot identify image file")
        return Image.open(path)

    stats = ReadStats()
    docs = MMC4Reader(tmp_path, transform=unreadable, single_image_keep=1.0).read(
        shard, stats=stats)
    assert stats["unreadable_image"] == 1 and stats["images"] == 1 and len(docs) == 1
