import math

import pytest
import torch

from mmlayers.layers.posembed import (
    official_sincos_1d,
    official_sincos_2d,
    resize_pos_table,
    sincos_1d,
    sincos_2d,
)


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


# -- official tables ([y|x], float32, bicubic resize) ------------------------------------

def _bicubic_oracle(grid, out_h, out_w):
    """fp64 bicubic (Keys, a = -0.75, half-pixel centres, edge-clamped) of (d, G, G) maps,
    written from the formula, one output pixel at a time."""
    a = -0.75

    def w(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        if t < 2:
            return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
        return 0.0

    d, g, _ = grid.shape
    out = torch.zeros(d, out_h, out_w, dtype=torch.float64)
    for i in range(out_h):
        sy = (i + 0.5) * g / out_h - 0.5
        y0 = math.floor(sy)
        for j in range(out_w):
            sx = (j + 0.5) * g / out_w - 0.5
            x0 = math.floor(sx)
            acc = torch.zeros(d, dtype=torch.float64)
            for m in range(-1, 3):
                for n in range(-1, 3):
                    yy, xx = min(max(y0 + m, 0), g - 1), min(max(x0 + n, 0), g - 1)
                    acc += w(sy - (y0 + m)) * w(sx - (x0 + n)) * grid[:, yy, xx].double()
            out[:, i, j] = acc
    return out


def test_sincos_2d_yx_layout_hand_computed():
    e = sincos_2d(2, 3, 8, layout="yx")
    # row 1, column 2: y = 1 first, then x = 2 (frequencies 1 and 0.01)
    want = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
            math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    torch.testing.assert_close(e[5], torch.tensor(want), rtol=0, atol=1e-7)
    # the default layout is unchanged: column half first
    torch.testing.assert_close(sincos_2d(2, 3, 8)[5], torch.tensor(want[4:] + want[:4]),
                               rtol=0, atol=1e-7)


def test_official_table_hand_computed_and_float32_bits():
    import numpy as np

    e = official_sincos_2d(3, 8, prefix_rows=1)
    assert e.shape == (10, 8) and e.dtype == torch.float32
    assert e[0].abs().max().item() == 0.0  # the zero prefix (CLS) row
    # row 2, column 1 -> y = 2, x = 1; frequencies 10000^(-k/2) = 1, 0.01
    want = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),
            math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    torch.testing.assert_close(e[1 + 2 * 3 + 1].double(), torch.tensor(want, dtype=torch.float64),
                               rtol=0, atol=1e-7)
    # every step in float32: omega_k = 1 / 10000^(k/K), pos * omega, sin / cos
    g, dim = 5, 16
    k = dim // 4
    om = np.float32(1.0) / np.float32(10000.0) ** (np.arange(k, dtype=np.float32) / np.float32(k))
    rows = []
    for i in range(g):
        for j in range(g):
            ay, ax = np.float32(i) * om, np.float32(j) * om
            rows.append(np.concatenate([np.sin(ay), np.cos(ay), np.sin(ax), np.cos(ax)]))
    assert torch.equal(official_sincos_2d(g, dim), torch.from_numpy(np.stack(rows)))


@pytest.mark.parametrize("size", [(2, 2), (6, 6), (3, 5)])
def test_resize_pos_table_matches_bicubic_formula(size):
    g, d = 4, 8
    table = torch.randn(1 + g * g, d, dtype=torch.float64)
    out = resize_pos_table(table, size, prefix_rows=1)
    assert out.dtype == torch.float64 and out.shape == (1 + size[0] * size[1], d)
    assert torch.equal(out[0], table[0])
    # the official resize runs in float32: round the input and compare to fp32 precision
    want = _bicubic_oracle(table[1:].float().double().T.reshape(d, g, g), *size)
    got = out[1:].T.reshape(d, *size)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    # same size: the stored table itself, no float32 round trip
    assert resize_pos_table(table, g, prefix_rows=1) is table


def test_official_errors():
    with pytest.raises(ValueError, match="multiple of 4, got 6"):
        official_sincos_2d(2, 6)
    with pytest.raises(ValueError, match="positive integer grid, got 0"):
        official_sincos_2d(0, 8)
    with pytest.raises(ValueError, match="layout must be 'xy' or 'yx', got 'hw'"):
        sincos_2d(2, 2, 8, layout="hw")
    with pytest.raises(ValueError, match="square grid, got 15 rows"):
        resize_pos_table(torch.zeros(15, 4), 2)
    with pytest.raises(ValueError, match="2-D tensor"):
        resize_pos_table(torch.zeros(16), 2)


def test_official_1d_table_float32_bits_and_values():
    import numpy as np

    e = official_sincos_1d(5, 8)
    assert e.shape == (5, 8) and e.dtype == torch.float32
    want = [math.sin(3), math.sin(0.3), math.sin(0.03), math.sin(0.003),
            math.cos(3), math.cos(0.3), math.cos(0.03), math.cos(0.003)]
    torch.testing.assert_close(e[3].double(), torch.tensor(want, dtype=torch.float64),
                               rtol=0, atol=1e-7)
    # every step in float32, positions up to 3000: the float32 products drift from the
    # exact table, and the official numbers are the float32 ones
    n, dim = 3000, 64
    om = np.float32(1.0) / np.float32(10000.0) ** (np.arange(dim // 2, dtype=np.float32)
                                                  / np.float32(dim // 2))
    ang = np.arange(n, dtype=np.float32)[:, None] * om
    want = torch.from_numpy(np.concatenate([np.sin(ang), np.cos(ang)], 1))
    got = official_sincos_1d(n, dim)
    assert torch.equal(got, want)
    assert (got.double() - sincos_1d(n, dim, dtype=torch.float64)).abs().max() > 1e-5
    assert torch.equal(official_sincos_1d(10, dim), got[:10])
    with pytest.raises(ValueError, match="multiple of 2, got 3"):
        official_sincos_1d(4, 3)
    with pytest.raises(ValueError, match="non-negative integer length, got -1"):
        official_sincos_1d(-1, 4)
