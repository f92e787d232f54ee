import math

import pytest
import torch

from mmlayers.layers.posembed import sincos_1d, sincos_2d


def test_sincos_1d_hand_computed():
    # dim 4 -> K = 2 frequencies: 1 and 10000^(-1/2) = 0.01
    e = sincos_1d(3, 4)
    assert e.dtype == torch.float32 and e.shape == (3, 4)
    want = [math.sin(2.0), math.sin(0.02), math.cos(2.0), math.cos(0.02)]
    torch.testing.assert_close(e[2], torch.tensor(want), rtol=0, atol=1e-7)
    torch.testing.assert_close(e[0], torch.tensor([0.0, 0.0, 1.0, 1.0]), rtol=0, atol=0)


def test_sincos_1d_explicit_positions_and_temperature():
    e = sincos_1d(torch.tensor([0.5, -3.0]), 2, temperature=100.0)
    torch.testing.assert_close(e, torch.tensor([[math.sin(0.5), math.cos(0.5)],
                                                [math.sin(-3.0), math.cos(-3.0)]]))
    e = sincos_1d([7.0], 4, temperature=100.0)  # frequencies 1, 0.1
    torch.testing.assert_close(e[0], torch.tensor([math.sin(7), math.sin(0.7),
                                                   math.cos(7), math.cos(0.7)]))


def test_sincos_2d_hand_computed():
    # dim 8 -> K = 2 frequencies (1, 0.01); index i*W + j = row 1, column 2 -> x=2, y=1
    e = sincos_2d(2, 3, 8)
    assert e.shape == (6, 8) and e.dtype == torch.float32
    want = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),
            math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    torch.testing.assert_close(e[1 * 3 + 2], torch.tensor(want), rtol=0, atol=1e-7)
    # column coordinate in the first half, row coordinate in the second
    torch.testing.assert_close(e[2, :4], e[5, :4])
    torch.testing.assert_close(e[3, 4:], e[5, 4:])


def test_sincos_2d_matches_1d_halves():
    e = sincos_2d(5, 7, 16)
    ex, ey = sincos_1d(7, 8), sincos_1d(5, 8)
    grid = e.view(5, 7, 16)
    torch.testing.assert_close(grid[:, :, :8], ex[None].expand(5, 7, 8))
    torch.testing.assert_close(grid[:, :, 8:], ey[:, None].expand(5, 7, 8))


def test_sincos_2d_base_size():
    torch.testing.assert_close(sincos_2d(4, 4, 8, base_size=(4, 4)), sincos_2d(4, 4, 8))
    # a 4x4 map in the frame of a 2x2 grid: x = (j + 0.5) * 2/4 - 0.5 -> -0.25 for j = 0
    e = sincos_2d(4, 4, 8, base_size=(2, 2))
    assert e[0, 0].item() == pytest.approx(math.sin(-0.25), abs=1e-7)
    assert e[15, 4].item() == pytest.approx(math.sin(1.25), abs=1e-7)  # y for i = 3


def test_sincos_deterministic_dtype_device():
    a = sincos_2d(3, 3, 12, dtype=torch.float64)
    assert a.dtype == torch.float64
    torch.testing.assert_close(a.float(), sincos_2d(3, 3, 12), rtol=0, atol=0)


@pytest.mark.parametrize(("fn", "args", "match"), [
    (sincos_1d, (4, 3), "multiple of 2, got 3"),
    (sincos_2d, (2, 2, 6), "multiple of 4, got 6"),
    (sincos_2d, (0, 2, 8), "positive integer height, got 0"),
    (sincos_1d, (-1, 4), "non-negative length, got -1"),
    (sincos_1d, (torch.zeros(2, 2), 4), r"1-D sequence, got shape \(2, 2\)"),
])
def test_sincos_errors(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)
