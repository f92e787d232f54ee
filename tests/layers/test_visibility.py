"""Visibility masks from hand-built token sequences, against a per-token loop oracle."""

from __future__ import annotations

import pytest
import torch

from mmlayers.layers.visibility import (
    image_starts,
    image_visibility,
    previous_image_visibility,
)

S, SOI, IMG, PAD, X, EOS = 1, 5, 7, 0, 9, 2
IDS = dict(soi_id=SOI, image_id=IMG, bos_id=S)


def loop_oracle(row, pad_id=None):
    """Token t sees image k iff start_k ≤ t and start_k > latest <s> at or before t."""
    starts = [t for t in range(1, len(row)) if row[t] == IMG and row[t - 1] == SOI]
    out = []
    for t, tok in enumerate(row):
        bos = max([i for i in range(t + 1) if row[i] == S], default=-1)
        out.append([bos < st <= t and tok != pad_id for st in starts])
    return out, starts


def test_two_packed_documents_and_trailing_soi():
    row = [S, X, SOI, IMG, IMG, X, SOI, IMG, IMG, EOS, S, X, SOI, IMG, IMG, X, SOI]
    vis, count = image_visibility(torch.tensor([row]), **IDS)
    assert count.tolist() == [3]
    assert vis.shape == (1, len(row), 3)
    want = [[0, 0, 0]] * 3 + [[1, 0, 0]] * 4 + [[1, 1, 0]] * 3 + [[0, 0, 0]] * 3 \
        + [[0, 0, 1]] * 4
    assert vis[0].int().tolist() == want
    # <soi> does not see the image it opens; the image's own tokens do
    assert not vis[0, 6, 1] and vis[0, 7, 1]
    oracle, _ = loop_oracle(row)
    assert vis[0].tolist() == oracle


def test_padding_rows_and_ragged_image_counts():
    rows = [
        [S, SOI, IMG, IMG, X, SOI, IMG, IMG, X, X],
        [PAD, PAD, PAD, S, X, SOI, IMG, IMG, X, X],  # left padding, one image
        [PAD] * 10,  # all padding
    ]
    ids = torch.tensor(rows)
    vis, count = image_visibility(ids, **IDS, pad_id=PAD)
    assert count.tolist() == [2, 1, 0]
    assert vis.shape == (3, 10, 2)
    for r, row in enumerate(rows):
        oracle, starts = loop_oracle(row, pad_id=PAD)
        got = vis[r, :, :len(starts)].tolist()
        assert got == oracle
        assert not vis[r, :, len(starts):].any()
    assert not vis[2].any()
    starts, _ = image_starts(ids, soi_id=SOI, image_id=IMG)
    assert starts.tolist() == [[2, 6], [6, 10], [10, 10]]


def test_explicit_m_and_random_sequences_match_loop():
    g = torch.Generator().manual_seed(0)
    vocab = torch.tensor([S, SOI, IMG, IMG, X, X, X])
    ids = vocab[torch.randint(0, len(vocab), (4, 40), generator=g)]
    vis, count = image_visibility(ids, **IDS, m=12)
    assert vis.shape == (4, 40, 12)
    for r in range(4):
        oracle, starts = loop_oracle(ids[r].tolist())
        assert count[r] == len(starts) and len(starts) <= 12
        assert vis[r, :, :len(starts)].tolist() == oracle


def test_previous_image_visibility():
    row = [S, SOI, IMG, X, SOI, IMG, X, SOI, IMG, S, SOI, IMG, X, SOI, IMG, IMG]
    vis, count = previous_image_visibility(torch.tensor([row, [S, X] + [PAD] * 14]), **IDS)
    assert count.tolist() == [5, 0]
    assert vis.shape == (2, 5, 5)
    want = torch.zeros(5, 5, dtype=torch.int)
    want[1, 0] = want[2, 1] = want[4, 3] = 1  # image 3 opens a new segment: sees nothing
    assert vis[0].int().tolist() == want.tolist()
    assert not vis[1].any()


def test_errors():
    with pytest.raises(ValueError, match=r"shape \(b, n\)"):
        image_visibility(torch.tensor([S, SOI, IMG]), **IDS)
    with pytest.raises(ValueError, match="integer"):
        image_visibility(torch.zeros(1, 3), **IDS)
    with pytest.raises(TypeError, match="bos_id"):
        image_visibility(torch.zeros(1, 3, dtype=torch.long), soi_id=SOI, image_id=IMG,
                         bos_id="<s>")
