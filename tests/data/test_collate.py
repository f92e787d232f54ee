"""Collation: packing, truncation at image boundaries, every label rule, image bookkeeping."""

import random

import pytest
import torch
from PIL import Image

from mmlayers.data import (
    Document,
    InterleavedCollator,
    ShapesCorpus,
    image_to_tensor,
    interleaved_labels,
    word_level_tokenizer,
)
from mmlayers.layers.visibility import image_starts, previous_image_visibility

P, S, E, SOI, IMG = 0, 1, 2, 4, 5
DOT, A, BLUE, CIRCLE, NOW, RED = 6, 7, 8, 9, 10, 11
X = -100


@pytest.fixture(scope="module")
def tok():
    t = word_level_tokenizer(["a red circle. now blue"])
    assert t.convert_tokens_to_ids([".", "a", "blue", "circle", "now", "red"]) == list(range(6, 12))
    return t


def img(v, shape=(3, 4, 4)):
    return torch.full(shape, v)


def collate(tok, docs, **kw):
    kw = {"num_image_tokens": 2, "max_length": 64, **kw}
    return InterleavedCollator(tokenizer=tok, **kw)(docs)


def test_interleaved_document_tokens_labels_and_images(tok):
    b = collate(tok, [Document(["a red circle.", img(0.1), "now blue.", img(0.2)])])
    ids = [S, A, RED, CIRCLE, DOT, SOI, IMG, IMG, NOW, BLUE, DOT, SOI, IMG, IMG, E]
    assert b.input_ids.tolist() == [ids]
    assert b.labels.tolist() == [[X, A, RED, CIRCLE, DOT, SOI, X, X, NOW, BLUE, DOT, SOI, X, X, E]]
    assert b.attention_mask.tolist() == [[1] * 15]
    assert b.images.shape == (2, 3, 4, 4) and b.images[:, 0, 0, 0].tolist() == pytest.approx(
        [0.1, 0.2])
    assert b.images_per_row.tolist() == [2]
    assert b.image_row.tolist() == [0, 0] and b.image_soi.tolist() == [5, 11]
    assert b.image_bos.tolist() == [0, 0] and b.image_has_context.tolist() == [True, True]
    assert b.image_previous.tolist() == [-1, 0] and b.image_document.tolist() == [0, 0]
    assert b.row_documents == [[0]] and b.truncated == []


def test_caption_first_prompt_and_image_first_rules(tok):
    docs = [
        Document(["a red circle.", img(0.1), "now blue.", img(0.2)], caption_first=True),
        Document(["a red circle."], caption_first=True),  # no image: no loss at all
        Document([img(0.3), "a red circle."]),  # <s>→<soi> not trained, no context
        Document(["now blue.", img(0.4), "a circle."], prompt_items=1),
        Document(["now blue.", img(0.5), "a circle."], prompt_items=2),
    ]
    b = collate(tok, docs, pack=False)
    rows = [r[: int(m.sum())] for r, m in zip(b.labels.tolist(), b.attention_mask, strict=True)]
    assert rows == [
        [X, X, X, X, X, SOI, X, X, NOW, BLUE, DOT, SOI, X, X, E],
        [X, X, X, X, X, X],
        [X, X, X, X, A, RED, CIRCLE, DOT, E],
        [X, X, X, X, SOI, X, X, A, CIRCLE, DOT, E],
        [X, X, X, X, X, X, X, A, CIRCLE, DOT, E],
    ]
    assert b.image_has_context.tolist() == [True, True, False, True, True]
    assert b.image_previous.tolist() == [-1, 0, -1, -1, -1]
    assert b.images_per_row.tolist() == [2, 0, 1, 1, 1]
    assert b.image_row.tolist() == [0, 0, 2, 3, 4] and b.image_soi.tolist() == [5, 11, 1, 4, 4]


def test_packing_rows_and_padding(tok):
    docs = [Document([img(0.1), "a circle."]),         # 8 tokens
            Document(["a red circle.", img(0.2)]),     # 9 tokens
            Document(["blue."]),                       # 4 tokens
            Document([img(0.3), img(0.4)])]            # 8 tokens
    b = collate(tok, docs, max_length=18)
    assert b.row_documents == [[0, 1], [2, 3]]
    assert b.input_ids.tolist() == [
        [S, SOI, IMG, IMG, A, CIRCLE, DOT, E, S, A, RED, CIRCLE, DOT, SOI, IMG, IMG, E],
        [S, BLUE, DOT, E, S, SOI, IMG, IMG, SOI, IMG, IMG, E, P, P, P, P, P]]
    assert b.labels.tolist() == [
        [X, X, X, X, A, CIRCLE, DOT, E, X, A, RED, CIRCLE, DOT, SOI, X, X, E],
        [X, BLUE, DOT, E, X, X, X, X, SOI, X, X, E, X, X, X, X, X]]
    assert b.attention_mask.tolist() == [[1] * 17, [1] * 12 + [0] * 5]
    assert b.images_per_row.tolist() == [2, 2]
    assert b.image_row.tolist() == [0, 0, 1, 1] and b.image_soi.tolist() == [1, 13, 5, 8]
    assert b.image_bos.tolist() == [0, 8, 4, 4]
    assert b.image_has_context.tolist() == [False, True, False, True]
    # previous image only inside a segment: image 1 is first of document 1 although image 0
    # precedes it in the row
    assert b.image_previous.tolist() == [-1, -1, -1, 2]
    assert b.image_document.tolist() == [0, 1, 3, 3]
    assert b.images[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    padded = collate(tok, docs, max_length=18, pad_to_max_length=True)
    assert padded.input_ids.shape == (2, 18) and padded.labels[:, 17].tolist() == [X, X]
    single = collate(tok, docs, max_length=18, pack=False)
    assert single.row_documents == [[0], [1], [2], [3]] and single.input_ids.shape == (4, 9)


def test_documents_that_fill_a_row_exactly_share_it(tok):
    docs = [Document(["a red circle.", img(0.1)]), Document(["a red circle.", img(0.2)]),
            Document(["blue."])]                       # 9 + 9 = 18 tokens, then 4
    b = collate(tok, docs, max_length=18)
    assert b.row_documents == [[0, 1], [2]] and b.truncated == []
    assert b.attention_mask.tolist() == [[1] * 18, [1] * 4 + [0] * 14]
    one = collate(tok, docs[:1], max_length=9)         # exactly max_length: not truncated
    assert one.truncated == [] and one.input_ids.tolist() == [
        [S, A, RED, CIRCLE, DOT, SOI, IMG, IMG, E]]


def test_bookkeeping_agrees_with_visibility_masks(tok):
    corpus = ShapesCorpus(seed=4, length=12)
    col = InterleavedCollator(tokenizer=word_level_tokenizer(corpus.vocabulary()),
                              num_image_tokens=3, max_length=80)
    docs = list(corpus)
    b = col(docs)
    assert b.truncated == [] and len(b.row_documents) < len(docs)
    loaded = next(iter(torch.utils.data.DataLoader(corpus, batch_size=12, collate_fn=col)))
    assert torch.equal(loaded.input_ids, b.input_ids) and torch.equal(loaded.labels, b.labels)
    assert b.images.shape[0] == sum(d.num_images for d in docs) == int(b.images_per_row.sum())
    expected = [image_to_tensor(i) for d in docs for i in d.images]
    assert torch.equal(b.images, torch.stack(expected))
    starts, counts = image_starts(b.input_ids, soi_id=col.soi_id, image_id=col.image_id)
    assert counts.tolist() == b.images_per_row.tolist()
    flat = [s - 1 for row, c in zip(starts.tolist(), counts.tolist(), strict=True) for s in row[:c]]
    assert flat == b.image_soi.tolist()
    vis, _ = previous_image_visibility(b.input_ids, soi_id=col.soi_id, image_id=col.image_id,
                                       bos_id=col.bos_id)
    oracle, offset = [], 0
    for row, c in enumerate(counts.tolist()):
        for k in range(c):
            src = vis[row, k, :c]
            oracle.append(offset + int(src.float().argmax()) if src.any() else -1)
        offset += c
    assert oracle == b.image_previous.tolist()
    # texts decode back per document, in order
    for r, row_docs in enumerate(b.row_documents):
        ids = b.input_ids[r][b.attention_mask[r].bool()].tolist()
        segments = [col.tokenizer.decode(seg, skip_special_tokens=True) for seg in
                    _split(ids, col.bos_id)]
        assert segments == [" ".join(docs[i].texts) for i in row_docs]


def _split(ids, bos):
    out = []
    for t in ids:
        if t == bos:
            out.append([])
        out[-1].append(t)
    return out


def test_truncation_never_cuts_an_image(tok):
    doc = Document(["a red circle.", img(0.1), "now blue."])  # 5 + 3 + 3 + </s> = 12 tokens
    for max_length, ids, n_img in [
        (7, [S, A, RED, CIRCLE, DOT], 0),              # <soi><image><image> would be cut: dropped
        (6, [S, A, RED, CIRCLE, DOT], 0),
        (8, [S, A, RED, CIRCLE, DOT, SOI, IMG, IMG], 1),
        (10, [S, A, RED, CIRCLE, DOT, SOI, IMG, IMG, NOW, BLUE], 1),
        (3, [S, A, RED], 0),
        (12, [S, A, RED, CIRCLE, DOT, SOI, IMG, IMG, NOW, BLUE, DOT, E], 1),
    ]:
        b = collate(tok, [doc], max_length=max_length)
        assert b.input_ids.tolist() == [ids], max_length
        assert b.images.shape[0] == n_img and b.images_per_row.tolist() == [n_img]
        assert b.truncated == ([] if max_length == 12 else [0])
    # a truncated document fills its row; the next document starts a new one, whole
    b = collate(tok, [Document(["blue."]), doc, Document(["blue."])], max_length=9)
    assert b.row_documents == [[0], [1], [2]] and b.truncated == [1]
    assert b.input_ids[1].tolist() == [S, A, RED, CIRCLE, DOT, SOI, IMG, IMG, NOW]
    assert b.labels[1].tolist() == [X, A, RED, CIRCLE, DOT, SOI, X, X, NOW]
    # a document that fits an empty row but not the rest of this one moves, untruncated
    b = collate(tok, [Document(["blue."]), doc], max_length=12)
    assert b.row_documents == [[0], [1]] and b.truncated == [] and b.images.shape[0] == 1


def test_pad_shared_with_eos_keeps_eos_trained():
    t = word_level_tokenizer(["a red circle. now blue"])
    t.pad_token = None
    col = InterleavedCollator(tokenizer=t, num_image_tokens=1, max_length=6)
    assert col.pad_id == E
    b = col([Document(["blue."]), Document(["a red circle."])])
    assert b.input_ids.tolist() == [[S, BLUE, DOT, E, E, E], [S, A, RED, CIRCLE, DOT, E]]
    assert b.labels.tolist() == [[X, BLUE, DOT, E, X, X], [X, A, RED, CIRCLE, DOT, E]]


def _labels_oracle(ids, mask, ignore, bos, soi, image):
    out = []
    for t, tok_id in enumerate(ids):
        drop = (t == 0 or mask[t] == 0 or tok_id in (image, bos) or ignore[t]
                or (tok_id == soi and ids[t - 1] == bos))
        out.append(-100 if drop else tok_id)
    return out


def test_interleaved_labels_against_a_loop_oracle():
    rng = random.Random(0)
    ids = torch.tensor([[rng.choice([S, E, SOI, IMG, 7, 8, 9]) for _ in range(40)] for _ in range(6)])
    mask = torch.tensor([[1] * (40 - 3 * r) + [0] * (3 * r) for r in range(6)])
    ignore = torch.rand(6, 40, generator=torch.Generator().manual_seed(0)) < 0.2
    got = interleaved_labels(ids, bos_id=S, soi_id=SOI, image_id=IMG, attention_mask=mask,
                             ignore=ignore)
    for r in range(6):
        assert got[r].tolist() == _labels_oracle(ids[r].tolist(), mask[r].tolist(),
                                                 ignore[r].tolist(), S, SOI, IMG)
    assert (got != -100).sum() > 40  # the oracle comparison is not vacuous
    with_pad = interleaved_labels(ids, bos_id=S, soi_id=SOI, image_id=IMG, pad_id=E)
    assert not (with_pad == E).any() and (ids == E).any()


def test_pil_and_tensor_images_mix(tok):
    pil = Image.new("RGB", (4, 4), (255, 0, 0))
    b = collate(tok, [Document([pil, "a circle."]), Document([img(0.5), "blue."])])
    assert b.images.shape == (2, 3, 4, 4) and b.images[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_errors(tok):
    long_image_first = Document([img(0.1), "a red circle."])
    with pytest.raises(ValueError, match=r"documents\[1\] cannot fit in max_length=3: .*4 tokens"):
        collate(tok, [Document(["blue."]), long_image_first], max_length=3)
    with pytest.raises(ValueError, match=r"documents\[0\] has 9 tokens, more than max_length=6"):
        collate(tok, [long_image_first], max_length=6, truncate=False)
    with pytest.raises(ValueError, match=r"\(c, H, W\).*documents\[0\] has \(3, 4, 4\).*"
                                         r"documents\[1\] has \(3, 8, 8\)"):
        collate(tok, [Document([img(0.1)]), Document([img(0.1, (3, 8, 8))])])
    with pytest.raises(ValueError, match=r"documents\[0\].items\[0\] is text that contains"):
        collate(tok, [Document(["a <image> circle."])])
    with pytest.raises(TypeError, match="documents must be a non-empty sequence"):
        collate(tok, Document(["a"]))
    with pytest.raises(TypeError, match="documents must be a non-empty sequence"):
        collate(tok, [])
    with pytest.raises(TypeError, match=r"documents\[0\] must be a Document, got list"):
        collate(tok, [["a"]])
    with pytest.raises(ValueError, match="num_image_tokens must be a positive int, got 0"):
        InterleavedCollator(tokenizer=tok, num_image_tokens=0, max_length=8)
    with pytest.raises(ValueError, match=r"max_length must be an int ≥ 2.*got 1"):
        InterleavedCollator(tokenizer=tok, num_image_tokens=1, max_length=1)
    with pytest.raises(ValueError, match="ensure_image_tokens"):
        InterleavedCollator(tokenizer=tok, num_image_tokens=1, max_length=8, soi_token="<boi>")
    with pytest.raises(ValueError, match=r"input_ids must have the shape|must have the shape"):
        interleaved_labels(torch.zeros(2, 3, dtype=torch.long), bos_id=1, soi_id=2, image_id=3,
                           attention_mask=torch.ones(2, 4))
