"""Shapes corpus: pixel rules read back what was rendered, determinism, documents, scoring."""

import pytest
import torch

from mmlayers.data import (
    COLORS,
    POSITIONS,
    Document,
    ShapeAttributes,
    ShapesCorpus,
    caption_matches,
    describe_image,
    image_to_tensor,
    parse_caption,
    render_shapes,
    score_image,
)


def _readback(corpus, noise=0.0, generator=None):
    ok = total = 0
    for doc in corpus:
        for img, attrs in zip(doc.images, doc.meta["images"], strict=True):
            if noise:
                img = (image_to_tensor(img) + noise * torch.randn(
                    3, corpus.size, corpus.size, generator=generator)).clamp(0, 1)
            total += 1
            ok += corpus.describe(img) == list(attrs)
    return ok / total, total


@pytest.mark.parametrize("seed, size, colors, max_shapes, length", [
    (0, 32, ("red", "green", "blue", "yellow"), 2, 60),
    (1, 32, ("red", "green", "blue", "yellow"), 1, 40),
    (2, 48, tuple(COLORS), 3, 30),
    (3, 64, tuple(COLORS), 3, 36),
])
def test_rules_read_back_rendered_attributes(seed, size, colors, max_shapes, length):
    corpus = ShapesCorpus(seed=seed, size=size, length=length, colors=colors,
                          max_shapes=max_shapes)
    accuracy, total = _readback(corpus)
    assert total >= 50
    assert accuracy >= 0.99, accuracy


def test_rules_tolerate_pixel_noise():
    corpus = ShapesCorpus(seed=5, length=30)
    accuracy, _ = _readback(corpus, noise=0.05, generator=torch.Generator().manual_seed(0))
    assert accuracy >= 0.95, accuracy


def test_every_attribute_read_back_on_a_grid():
    for shape in ("circle", "square", "triangle"):
        for size_name in ("small", "large"):
            for p, x0 in zip(POSITIONS, (0, 11, 22), strict=True):
                for color in ("red", "green", "blue", "yellow", "purple", "orange"):
                    a = ShapeAttributes(color, shape, p, size_name)
                    assert describe_image(render_shapes([(a, x0, 12)])) == [a]


def test_render_known_pixels_and_blank():
    a = ShapeAttributes("green", "square", "centre", "small")  # 6 px at size 32
    img = image_to_tensor(render_shapes([(a, 13, 10)]))
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[10:16, 13:19] = True
    green = torch.tensor(COLORS["green"]) / 255
    assert torch.allclose(img.permute(1, 2, 0)[inside], green.expand(36, 3))
    assert (img.permute(1, 2, 0)[~inside] == 1).all()
    assert describe_image(torch.ones(3, 32, 32)) == []
    assert describe_image(torch.zeros(3, 32, 32)) == []  # black is no palette colour


def test_determinism_by_seed():
    a = ShapesCorpus(seed=7, length=12)
    b = ShapesCorpus(seed=7, length=40, tensors=True)  # length and format do not matter
    later_first = b[11]
    for i in range(12):
        da, db = a[i], b[i]
        assert da.meta == db.meta and da.texts == db.texts and da.caption_first == db.caption_first
        for x, y in zip(da.images, db.images, strict=True):
            assert torch.equal(image_to_tensor(x), y)
    assert later_first.meta == a[11].meta and a[-1].meta == a[11].meta
    other = ShapesCorpus(seed=8, length=12)
    assert sum(other[i].meta == a[i].meta for i in range(12)) < 6


def test_document_kinds_and_metadata():
    corpus = ShapesCorpus(seed=0, length=80, max_images=4)
    seen = set()
    for doc in corpus:
        assert isinstance(doc, Document)
        kind, images, texts = doc.meta["kind"], doc.meta["images"], doc.meta["texts"]
        seen.add(kind)
        assert doc.num_images == len(images) == len(texts)
        assert doc.caption_first == (kind == "caption_image")
        # the first text is a caption naming exactly the first image's shapes, sizes, places
        assert parse_caption(texts[0]) == list(images[0])
        if kind == "caption_image":
            assert isinstance(doc.items[0], str) and len(doc.items) == 2
        elif kind == "image_caption":
            assert not isinstance(doc.items[0], str) and len(doc.items) == 2
        else:
            assert 2 <= doc.num_images <= (2 if kind == "edit" else 4)
            assert all(len(s) == 1 for s in images)
            for k in range(1, len(images)):
                (old,), (new,) = images[k - 1], images[k]
                changed = [f for f in ("color", "shape", "position", "size")
                           if getattr(old, f) != getattr(new, f)]
                assert len(changed) == 1
                word = {"color": new.color, "shape": new.shape, "size": new.size,
                        "position": new.position}[changed[0]]
                assert texts[k].startswith("now ") and word in texts[k]
            # after the opening caption/image pair: instruction, image, instruction, image, …
            assert [isinstance(x, str) for x in doc.items[2:]] == [True, False] * (len(images) - 1)
            assert doc.items[2::2] == texts[1:]
    assert seen == {"caption_image", "image_caption", "edit", "sequence"}
    edits = ShapesCorpus(seed=0, length=4, kinds=("edit",))
    assert [d.texts[1] for d in edits] == [d.meta["texts"][1] for d in edits]


def test_image_score_known_answers():
    left = ShapeAttributes("red", "circle", "left", "large")
    right = ShapeAttributes("blue", "square", "right", "small")
    img = render_shapes([(left, 0, 11), (right, 24, 13)])
    s = score_image(img, [left, right])
    assert (s.color, s.shape, s.position, s.size, s.exact) == (1.0, 1.0, 1.0, 1.0, True)
    wrong = ShapeAttributes("red", "triangle", "centre", "small")
    s = score_image(img, [left, wrong])
    assert (s.color, s.shape, s.position, s.size, s.exact) == (0.5, 0.5, 0.5, 0.5, False)
    s = score_image(render_shapes([(ShapeAttributes("yellow", "circle", "left", "small"), 2, 5)]),
                    [left])
    assert (s.color, s.shape, s.position, s.size) == (0.0, 1.0, 1.0, 0.0)


def test_caption_parsing_and_matching():
    want = [ShapeAttributes("red", "circle", "left", "small"),
            ShapeAttributes("blue", "square", "right", "large")]
    text = "a small red circle on the left and a large blue square on the right."
    assert parse_caption(text) == want
    assert parse_caption("A BLUE square  in the centre.") == [
        ShapeAttributes("blue", "square", "centre", None)]
    assert caption_matches("a blue square and a red circle.", want)  # order-free, no place
    assert not caption_matches("a blue square and a red circle.", want, position=True)
    assert caption_matches(text, want, position=True)
    assert caption_matches(text, want, position=True, size=True)
    swapped = "a large red circle on the left and a small blue square on the right."
    assert caption_matches(swapped, want, position=True)
    assert not caption_matches(swapped, want, position=True, size=True)
    assert not caption_matches("a red circle on the left and a blue square on the right.",
                               want, size=True)                   # sizes left out
    assert not caption_matches("a red circle.", want)
    assert not caption_matches("a red circle and a red circle and a blue square.", want)
    assert not caption_matches("a green circle and a blue square.", want)
    assert parse_caption("nothing here.") == []


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 16}, r"size must be an int in \[24, 256\].*16"),
    ({"colors": ("red", "pink")}, r"colors must be .*'pink'"),
    ({"kinds": "edit"}, "kinds must be"),
    ({"max_shapes": 4}, r"max_shapes must be in \[1, 3\]"),
    ({"max_images": 1}, "max_images must be at least 2"),
    ({"length": -1}, "length must be"),
    ({"colors": ("red",)}, r"max_shapes must be in \[1, 1\]"),
    ({"colors": ("red",), "max_shapes": 1}, "at least 2 colors"),
])
def test_corpus_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesCorpus(**kwargs)


def test_rule_errors():
    corpus = ShapesCorpus(length=3)
    with pytest.raises(IndexError, match="index 3 out of range"):
        corpus[3]
    with pytest.raises(TypeError, match="index must be an int"):
        corpus["0"]
    with pytest.raises(ValueError, match=r"RGB image \(3, H, W\).*\(1, 8, 8\)"):
        describe_image(torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="colors must be names"):
        describe_image(torch.ones(3, 32, 32), colors=("teal",))
    with pytest.raises(ValueError, match="cannot render"):
        render_shapes([(ShapeAttributes("red", "star", "left", "small"), 0, 0)])
    with pytest.raises(ValueError, match="at least one"):
        score_image(torch.ones(3, 32, 32), [])
