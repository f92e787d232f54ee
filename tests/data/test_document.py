"""Document schema: validation, image counting, PIL/tensor conversion."""

import pytest
import torch
from PIL import Image

from mmlayers.data import Document, image_to_tensor, is_image


def test_counts_and_views():
    a, b = torch.zeros(3, 4, 4), Image.new("RGB", (4, 4))
    doc = Document(("x.", a, "y.", b), prompt_items=1, meta={"k": 1})
    assert doc.items == ["x.", a, "y.", b] and len(doc) == 4
    assert doc.num_images == 2 and doc.images == [a, b] and doc.texts == ["x.", "y."]
    assert Document([]).num_images == 0
    assert is_image(b) and is_image(a) and not is_image("x")


def test_image_to_tensor_known_values():
    img = Image.new("RGB", (3, 2), (255, 0, 0))
    img.putpixel((2, 1), (0, 51, 102))
    t = image_to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(t[:, 1, 2], torch.tensor([0.0, 0.2, 0.4]))
    grey = image_to_tensor(Image.new("L", (2, 2), 255))
    assert grey.shape == (1, 2, 2) and grey.min() == 1.0
    rgba = image_to_tensor(Image.new("RGBA", (2, 2), (0, 255, 0, 10)))
    assert rgba.shape == (3, 2, 2) and rgba[1].min() == 1.0
    x = torch.rand(3, 2, 2, dtype=torch.float64)
    assert image_to_tensor(x).dtype == torch.float32
    with pytest.raises(TypeError, match="PIL image or a"):
        image_to_tensor([1, 2])


@pytest.mark.parametrize("kwargs, err, match", [
    ({"items": "a red circle."}, TypeError, "list of text and image"),
    ({"items": ["x", 3]}, TypeError, "item 1 must be a str or an image"),
    ({"items": [torch.zeros(4, 4)]}, ValueError, r"item 0: .*\(c, H, W\)"),
    ({"items": [torch.zeros(3, 4, 4, dtype=torch.uint8)]}, ValueError, "must be float"),
    ({"items": ["x", torch.full((3, 2, 2), 1.5)]}, ValueError, r"item 1: .*\[0, 1\].*1\.5"),
    ({"items": ["x"], "caption_first": 1}, TypeError, "caption_first must be a bool"),
    ({"items": ["x"], "prompt_items": 2}, ValueError, r"prompt_items .*\[0, 1\].*got 2"),
    ({"items": ["x"], "prompt_items": True}, ValueError, "prompt_items"),
    ({"items": ["x"], "meta": []}, TypeError, "meta must be a dict"),
])
def test_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        Document(**kwargs)
