"""SkipSynchronizer and the UNet's residuals against an independent oracle.

The oracle re-states the official UNet MMFS block with plain PyTorch and no mmlayers code:
LayerNorm, the 2-D sincos formula evaluated at pixel-centre-aligned coordinates of the
sample-size frame, own-pixel-centre reference points, one softmax over every level and
point plus the ignore slots (their m·l terms of exp(−log(m·l)) add exactly 1 to the
denominator), ``F.grid_sample`` per level and head, output projection, 1×1 conv.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from mmlayers.adapters.diffusion import UNetSynchronizer
from mmlayers.adapters.skip_sync import SkipSynchronizer

BLOCK = dict(value_dim=6, dim=8, heads=2, points=3, level_sizes=(4, 2))
S = 4 * 4 + 2 * 2


def randomize(module, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return module


def oracle_residual(blk, x, pyramid, has_image):
    """(b, c, H, W) residual of one block, in float64, from its parameters only."""
    sd = {k: v.detach().double() for k, v in blk.state_dict().items()}
    x, pyramid = x.double(), pyramid.double()
    b, c, hgt, wdt = x.shape
    heads, points, sizes = BLOCK["heads"], BLOCK["points"], BLOCK["level_sizes"]
    d = BLOCK["dim"]
    dh, base = d // heads, blk.sync.base_size
    h0, w0 = blk.grid_size
    q = x.permute(0, 2, 3, 1).reshape(b, hgt * wdt, c)
    q = F.layer_norm(q, (c,), sd["query_norm.weight"], sd["query_norm.bias"], eps=1e-6)
    # position table: [sin x·ω, cos x·ω, sin y·ω, cos y·ω] with x, y in cells of (H0, W0)
    k = c // 4
    omega = 10000.0 ** (-torch.arange(k, dtype=torch.float64) / k)
    pos = torch.zeros(hgt * wdt, c, dtype=torch.float64)
    for i in range(hgt):
        for j in range(wdt):
            xc, yc = (j + 0.5) * w0 / wdt - 0.5, (i + 0.5) * h0 / hgt - 0.5
            pos[i * wdt + j] = torch.cat([(xc * omega).sin(), (xc * omega).cos(),
                                          (yc * omega).sin(), (yc * omega).cos()])
    q = q + pos
    v = F.layer_norm(pyramid, (pyramid.shape[-1],), sd["value_norm.weight"],
                     sd["value_norm.bias"], eps=1e-6)
    v = F.linear(v, sd["sync.value_proj.weight"], sd["sync.value_proj.bias"])  # (b, s, d)
    # one image, visible: relative position 1
    qk = F.linear(q, sd["sync.query_proj.weight"], sd["sync.query_proj.bias"])
    qk = qk + sd["sync.query_relpos.weight"][1]
    off = F.linear(qk, sd["sync.sampling_offsets.weight"], sd["sync.sampling_offsets.bias"])
    off = off.reshape(b, hgt * wdt, heads, points, 2)
    logit = F.linear(qk, sd["sync.attention_weights.weight"],
                     sd["sync.attention_weights.bias"])
    logit = logit.reshape(b, hgt * wdt, heads, len(sizes), points)
    ref = torch.zeros(hgt * wdt, 2, dtype=torch.float64)
    for i in range(hgt):
        for j in range(wdt):
            ref[i * wdt + j] = torch.tensor([(j + 0.5) / wdt, (i + 0.5) / hgt])
    e = logit.exp()
    weight = e / (e.sum((-2, -1), keepdim=True) + 1.0)  # + the ignore slots
    out = torch.zeros(b, hgt * wdt, heads, dh, dtype=torch.float64)
    start = 0
    for li, size in enumerate(sizes):
        vl = v[:, start:start + size * size].reshape(b, size, size, heads, dh)
        start += size * size
        vl = vl.permute(0, 3, 4, 1, 2).reshape(b * heads, dh, size, size)
        loc = ref[None, :, None, None] + off * (size / base) / size  # (b, n, h, p, 2)
        grid = (2 * loc - 1).permute(0, 2, 1, 3, 4).reshape(b * heads, hgt * wdt, points, 2)
        smp = F.grid_sample(vl, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (b·h, dh, n, p)
        smp = smp.reshape(b, heads, dh, hgt * wdt, points).permute(0, 3, 1, 4, 2)
        out = out + (weight[:, :, :, li, :, None] * smp).sum(3)
    out = out * has_image.double()[:, None, None, None]  # no image: only the ignore value
    out = F.linear(out.reshape(b, hgt * wdt, d), sd["sync.output_proj.weight"],
                   sd["sync.output_proj.bias"])
    out = F.linear(out, sd["conv.weight"][:, :, 0, 0], sd["conv.bias"])
    return out.reshape(b, hgt, wdt, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize("hw,size,grid", [((4, 4), 4, (8, 8)), ((3, 5), 4, (6, 10)),
                                          ((8, 8), 8, (8, 8))])
def test_block_matches_independent_oracle(hw, size, grid):
    torch.manual_seed(0)
    blk = SkipSynchronizer(channels=8, size=size, grid_size=grid, dtype=torch.float64,
                           **BLOCK)
    randomize(blk, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, *hw, generator=g, dtype=torch.float64)
    pyr = torch.randn(3, S, 6, generator=g, dtype=torch.float64)
    has = torch.tensor([True, False, True])
    with torch.no_grad():
        got = blk(x, blk.project_values(pyr[:, None]), has)
    want = oracle_residual(blk, x, pyr, has)
    assert want[0].std() > 0.1 and (want[0] - want[1]).abs().amax() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_unet_residuals_match_oracle_through_diffusers_residual_inputs():
    """Each skip tensor and the mid output get the oracle residual of its own block."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).double().eval()
    sync = UNetSynchronizer.for_unet(unet, dtype=torch.float64, **BLOCK)
    randomize(sync, seed=3, scale=0.3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t, ctx = torch.tensor([3, 700]), torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    pyr = torch.randn(2, S, 6, generator=g, dtype=torch.float64)
    has = torch.tensor([True, False])
    skips, mid = [], []
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, o: skips.append(o))]
    hooks += [b.register_forward_hook(lambda m, a, o: skips.extend(o[1]))
              for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, o: mid.append(o)))
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx)
    for h in hooks:
        h.remove()
    assert [s.shape[-1] for s in skips] == [8, 8, 4, 4]
    res = tuple(oracle_residual(blk, s, pyr, has) for blk, s in zip(sync.down, skips,
                                                                      strict=True))
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=res,
                    mid_block_additional_residual=oracle_residual(sync.mid, mid[0], pyr,
                                                                  has)).sample
        sync.attach(unet)
        with sync.condition(pyr, has):
            got = unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
