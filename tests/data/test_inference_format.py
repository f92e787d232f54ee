"""Generation requests: the official inference format and ours, and their error messages."""

from __future__ import annotations

import json

import pytest
import torch

from mmlayers.data import read_generation_requests, to_pil


def write_images(root, n):
    for i in range(n):   # image i is uniformly i / 10 so the order can be read back
        to_pil(torch.full((3, 4, 4), i / 10)).save(root / f"{i}.png")


def dump(root, data, name="in.json"):
    path = root / name
    path.write_text(json.dumps(data))
    return path


def kinds(items):
    return [x if isinstance(x, str) else round(x.mean().item() * 10) for x in items]


def test_official_format_places_images_before_or_after_their_sentence(tmp_path):
    write_images(tmp_path, 4)
    rec = {"sentences": ["one.", "two.", "three."],
           "images": ["0.png", "1.png", "2.png", "3.png"],
           "sentence_ixs": [0, 1, 1, 2], "image_first": [True, False, False, True],
           "generate_mode": "generate_images", "num_iter": 2}
    (req,) = read_generation_requests(dump(tmp_path, [rec]))
    assert kinds(req.items) == [0, "one.", "two.", 1, 2, 3, "three."]
    assert req.generate == "image" and req.turns == 2
    assert [p.rsplit("/", 1)[-1] for p in req.image_paths] == ["0.png", "1.png", "2.png", "3.png"]
    rec.update(generate_mode="generate_texts")
    rec.pop("num_iter")
    (req,) = read_generation_requests(dump(tmp_path, rec))   # one object, defaults
    assert req.generate == "text" and req.turns == 1


def test_our_format_with_options_and_image_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    write_images(tmp_path / "imgs", 2)
    rec = {"items": ["a red circle.", {"image": "1.png"}, "now blue."], "generate": "interleaved",
           "turns": 3, "seed": 4, "max_new_tokens": 7}
    (req,) = read_generation_requests(dump(tmp_path, [rec]), image_root=tmp_path / "imgs")
    assert kinds(req.items) == ["a red circle.", 1, "now blue."]
    assert (req.generate, req.turns, req.options) == ("interleaved", 3,
                                                        {"seed": 4, "max_new_tokens": 7})
    assert req.items[1].shape == (3, 4, 4)


@pytest.mark.parametrize("record, match", [
    ({"items": []}, "non-empty list"),
    ({"items": ["x", 3]}, r"items\[1\]"),
    ({"items": ["x"], "generate": "video"}, "generate must be one of"),
    ({"items": ["x"], "turns": 0}, "turns must be an int >= 1"),
    ({"items": ["x"], "colour": 1}, r"unknown keys \['colour'\]"),
    ({"items": [{"image": "nope.png"}]}, "nope.png"),
    ({"sentences": ["a"], "images": ["0.png"], "sentence_ixs": [3], "image_first": [True]},
     r"sentence_ixs\[0\] = 3"),
    ({"sentences": ["a"], "images": ["0.png"], "sentence_ixs": [], "image_first": []},
     "one length"),
    ({"sentences": ["a"], "generate_mode": "draw"}, "generate_mode must be one of"),
    ({"text": "a"}, "neither format"),
    ([], "non-empty list"),
])
def test_bad_records_name_the_record_and_the_problem(tmp_path, record, match):
    write_images(tmp_path, 1)
    data = record if isinstance(record, list) else [{"items": ["fine"]}, record]
    with pytest.raises(ValueError, match=match) as err:
        read_generation_requests(dump(tmp_path, data))
    if isinstance(record, dict):
        assert "record 1" in str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="no such request file"):
        read_generation_requests(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="cannot parse"):
        read_generation_requests(tmp_path / "bad.json")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        read_generation_requests(dump(tmp_path, {"items": [{"image": "broken.png"}]}))


def test_official_semantics_target_and_center_crop(tmp_path):
    write_images(tmp_path, 2)
    wide = torch.zeros(3, 4, 8)
    wide[:, :, 2:6] = 1.0  # the central 4x4 square is white, the sides black
    to_pil(wide).save(tmp_path / "wide.png")
    rec = {"sentences": ["one.", "two.", "three."], "images": ["0.png", "wide.png", "1.png"],
           "sentence_ixs": [0, 1, 1], "image_first": [False, False, True],
           "generate_mode": "generate_images"}
    plain, = read_generation_requests(dump(tmp_path, [rec]))
    assert not plain.official and plain.target_index is None
    assert plain.items[4].shape == (3, 4, 8)  # no crop without official semantics
    req, = read_generation_requests(dump(tmp_path, [rec]), official=True)
    # document: one. [0] [1] two. [wide] three.  -> the last listed image is item 4
    assert kinds(req.items[:4]) == ["one.", 0, 1, "two."]
    assert req.official and req.target_index == 4 and req.items[4].shape == (3, 4, 4)
    assert req.items[4].min().item() == 1.0  # the centre was kept
    texts = {**rec, "generate_mode": "generate_texts", "official_semantics": True}
    req, = read_generation_requests(dump(tmp_path, [texts]))  # the record selects it
    assert req.official and req.target_index is None and req.generate == "text"
    assert req.turns == 2 and plain.turns == 1  # num_iter defaults: official 2, ours 1
    off = {**rec, "official_semantics": False}
    assert not read_generation_requests(dump(tmp_path, [off]), official=True)[0].official
    with pytest.raises(ValueError, match="record 0: official_semantics must be true or false"):
        read_generation_requests(dump(tmp_path, [{**rec, "official_semantics": "yes"}]))
    none = {"sentences": ["one."], "images": [], "sentence_ixs": [], "image_first": [],
            "generate_mode": "generate_images", "official_semantics": True}
    with pytest.raises(ValueError, match="regenerates the last listed image, but the request "
                                         "lists none"):
        read_generation_requests(dump(tmp_path, [none]))
