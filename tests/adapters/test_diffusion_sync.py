"""UNetSynchronizer on tiny diffusers UNets: identity at init, residuals on skips only (oracle:
diffusers' own ``down_block_additional_residuals``), remove(), contexts, bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from mmlayers.adapters.diffusion import UNetSynchronizer

SYNC = dict(value_dim=12, dim=16, heads=2, points=2, level_sizes=(8, 4))
S = 8 * 8 + 4 * 4



LAYOUTS = {
    "two": dict(block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "three": dict(block_out_channels=(16, 32, 32), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}


def tiny_unet(layout="two", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(sample_size=16, in_channels=3, out_channels=3, norm_num_groups=8,
               cross_attention_dim=32, attention_head_dim=8, **LAYOUTS[layout])
    cfg.update(kw)
    return UNet2DConditionModel(**cfg).eval()


def inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 16, 16, generator=g), torch.tensor([7, 500, 999, 3][:b]),
            torch.randn(b, 5, 32, generator=g), torch.randn(b, S, 12, generator=g))


def randomize_convs(sync, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in [*sync.down, sync.mid]:
            blk.conv.weight.copy_(torch.randn(blk.conv.weight.shape, generator=g) * 0.2)
            blk.conv.bias.copy_(torch.randn(blk.conv.bias.shape, generator=g) * 0.2)
            blk.sync.output_proj.bias.copy_(torch.randn(blk.channels, generator=g))
    return sync


def run(unet, x, t, ehs, **kw):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ehs, **kw).sample


def record_skips(unet, x, t, ehs):
    """Skip tensors and mid output of a bare forward, captured by plain hooks."""
    skips, mid = [], []
    hs = [unet.conv_in.register_forward_hook(lambda m, a, o: skips.append(o))]
    hs += [b.register_forward_hook(lambda m, a, o: skips.extend(o[1])) for b in unet.down_blocks]
    hs.append(unet.mid_block.register_forward_hook(lambda m, a, o: mid.append(o)))
    run(unet, x, t, ehs)
    for h in hs:
        h.remove()
    return skips, mid[0]


def test_sd21_layout_has_twelve_skips_at_official_base_sizes():
    cfg = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
               attention_head_dim=(5, 10, 20, 20),
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    channels, sides, mid_c, mid_s, hw = UNetSynchronizer.skip_layout(unet)
    assert channels == [320] * 4 + [640] * 3 + [1280] * 5
    # the official block k uses base_spatial_shape [64, 32, 16, 8][k // 3]; the mid one 8
    assert sides == [[64, 32, 16, 8][k // 3] for k in range(12)]
    assert (mid_c, mid_s, hw) == (1280, 8, (64, 64))


@pytest.mark.parametrize("layout,count", [("two", 4), ("three", 9)])
def test_identity_at_init_and_skip_count(layout, count):
    unet = tiny_unet(layout)
    x, t, ehs, pyr = inputs()
    ref = run(unet, x, t, ehs)
    sync = UNetSynchronizer.for_unet(unet, **SYNC).attach(unet)
    assert len(sync.down) == count
    with sync.condition(pyr, torch.tensor([True, False])):
        out = run(unet, x, t, ehs)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("layout", ["two", "three"])
def test_residuals_land_on_skip_tensors_only(layout):
    unet = tiny_unet(layout)
    x, t, ehs, pyr = inputs()
    sync = randomize_convs(UNetSynchronizer.for_unet(unet, **SYNC))
    has = torch.tensor([True, False])
    skips, mid = record_skips(unet, x, t, ehs)
    assert len(skips) == len(sync.down)
    with torch.no_grad():
        vals = [blk.project_values(pyr[:, None]) for blk in [*sync.down, sync.mid]]
        res = [blk(s, v, has) for blk, s, v in zip(sync.down, skips, vals, strict=False)]
        mid_res = sync.mid(mid, vals[-1], has)
    assert all(r.abs().amax() > 1e-3 for r in res)
    # diffusers adds down_block_additional_residuals to the skip tensors after the down path
    expected = run(unet, x, t, ehs, down_block_additional_residuals=tuple(res),
                   mid_block_additional_residual=mid_res)
    sync.attach(unet)
    with sync.condition(pyr, has):
        out = run(unet, x, t, ehs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert (out - run(unet, x, t, ehs)).abs().amax() > 1e-3  # outside condition: bare


def test_remove_restores_unet():
    unet = tiny_unet("three")
    x, t, ehs, pyr = inputs()
    ref, keys = run(unet, x, t, ehs), {k: v.clone() for k, v in unet.state_dict().items()}
    sync = randomize_convs(UNetSynchronizer.for_unet(unet, **SYNC)).attach(unet)
    assert sync.attached
    with sync.condition(pyr):
        assert not torch.equal(run(unet, x, t, ehs), ref)
    sync.remove()
    assert not sync.attached
    with sync.condition(pyr):
        assert torch.equal(run(unet, x, t, ehs), ref)
    sd = unet.state_dict()
    assert sd.keys() == keys.keys() and all(torch.equal(sd[k], keys[k]) for k in keys)
    for m in unet.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks)


def test_condition_is_reentrant_and_cleared_after_exceptions():
    unet = tiny_unet()
    x, t, ehs, pyr = inputs()
    other = torch.randn_like(pyr)
    sync = randomize_convs(UNetSynchronizer.for_unet(unet, **SYNC)).attach(unet)
    bare = run(unet, x, t, ehs)
    with sync.condition(pyr):
        a = run(unet, x, t, ehs)
    with sync.condition(other):
        b = run(unet, x, t, ehs)
    with sync.condition(pyr):
        with sync.condition(other):
            assert torch.equal(run(unet, x, t, ehs), b)
        assert torch.equal(run(unet, x, t, ehs), a)
    with pytest.raises(RuntimeError, match="boom"), sync.condition(pyr):
        raise RuntimeError("boom")
    assert torch.equal(run(unet, x, t, ehs), bare)
    # an error in the middle of a forward (batch 3 is not a multiple of 2) leaves no residue
    with sync.condition(pyr):
        with pytest.raises(ValueError, match="multiple of the pyramid batch"):
            run(unet, *(v[:1].repeat(3, *[1] * (v.dim() - 1)) for v in (x, t, ehs)))
        assert torch.equal(run(unet, x, t, ehs), a)
    assert torch.equal(run(unet, x, t, ehs), bare)


def test_batch_multiple_tiles_pyramid():
    unet = tiny_unet()
    x, t, ehs, pyr = inputs()
    sync = randomize_convs(UNetSynchronizer.for_unet(unet, **SYNC)).attach(unet)
    xx, tt, ee = torch.cat([x, x]), torch.cat([t, t]), torch.cat([ehs, ehs])
    has = torch.tensor([False, True])
    with sync.condition(pyr, has):
        tiled = run(unet, xx, tt, ee)
    with sync.condition(torch.cat([pyr, pyr]), torch.cat([has, has])):
        full = run(unet, xx, tt, ee)
    torch.testing.assert_close(tiled, full, rtol=1e-6, atol=1e-6)


def test_no_previous_image_official_constant_and_zero_mode():
    unet = tiny_unet()
    x, t, ehs, pyr = inputs()
    bare = run(unet, x, t, ehs)
    sync = randomize_convs(UNetSynchronizer.for_unet(unet, **SYNC)).attach(unet)
    none = torch.zeros(2, dtype=torch.bool)
    # official: the block reads only the zero ignore value → Conv(output_proj(0)) everywhere
    with sync.condition(None):
        shortcut = run(unet, x, t, ehs)
    with sync.condition(pyr, none):
        full = run(unet, x, t, ehs)
    torch.testing.assert_close(shortcut, full, rtol=1e-5, atol=1e-6)
    assert (shortcut - bare).abs().amax() > 1e-3
    blk = sync.down[0]
    with torch.no_grad():
        r = blk(torch.randn(2, 32, 16, 16), blk.project_values(pyr[:, None]), none)
        const = blk.conv.weight[:, :, 0, 0] @ blk.sync.output_proj.bias + blk.conv.bias
    torch.testing.assert_close(r, const[None, :, None, None].expand_as(r), rtol=1e-5, atol=1e-6)
    sync.remove()
    zero = UNetSynchronizer.for_unet(unet, no_image="zero", **SYNC)
    zero.load_state_dict(sync.state_dict())
    zero.attach(unet)
    with zero.condition(pyr, none):
        assert torch.equal(run(unet, x, t, ehs), bare)
    with zero.condition(None):
        assert torch.equal(run(unet, x, t, ehs), bare)
    with zero.condition(pyr, torch.tensor([True, False])):
        mixed = run(unet, x, t, ehs)
    assert torch.equal(mixed[1], bare[1]) and (mixed[0] - bare[0]).abs().amax() > 1e-3


def test_gradients_reach_every_block_and_checkpointing_agrees():
    unet = tiny_unet("three")
    x, t, ehs, pyr = inputs()
    pyr.requires_grad_(True)
    sync = UNetSynchronizer.for_unet(unet, **SYNC).attach(unet)
    with sync.condition(pyr):
        unet(x, t, encoder_hidden_states=ehs).sample.square().mean().backward()
    for blk in [*sync.down, sync.mid]:  # zero convs: only the conv gets gradient at init
        assert blk.conv.weight.grad.abs().amax() > 0
    randomize_convs(sync)
    grads = []
    for ckpt in (False, True):
        unet.train()
        if ckpt:
            unet.enable_gradient_checkpointing()
        sync.zero_grad()
        with sync.condition(pyr):
            unet(x, t, encoder_hidden_states=ehs).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in sync.parameters() if p.grad is not None])
    assert all(blk.sync.value_proj.weight.grad.abs().amax() > 0 for blk in [*sync.down, sync.mid])
    assert len(grads[0]) == len(grads[1]) == len([*sync.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_input_errors():
    unet = tiny_unet()
    x, t, ehs, pyr = inputs()
    sync = UNetSynchronizer.for_unet(unet, **SYNC).attach(unet)
    with pytest.raises(ValueError, match="s=80, dv=12"), sync.condition(pyr[:, :-1]):
        pass
    with pytest.raises(ValueError, match="s=80, dv=12"), sync.condition(pyr[..., :-1]):
        pass
    with pytest.raises(ValueError, match="has_image"), sync.condition(pyr, torch.ones(3).bool()):
        pass
    with pytest.raises(RuntimeError, match="already attached"):
        sync.attach(unet)
    sync.remove()
    with pytest.raises(ValueError, match="do not match"):
        sync.attach(tiny_unet("three"))
    with pytest.raises(TypeError, match="conv_in"):
        UNetSynchronizer.for_unet(nn.Conv2d(3, 3, 1), value_dim=12)
    with pytest.raises(TypeError, match="mid_block"):
        UNetSynchronizer.for_unet(tiny_unet(mid_block_type=None), value_dim=12)
    with pytest.raises(ValueError, match="no_image"):
        UNetSynchronizer.for_unet(unet, no_image="skip", **SYNC)


def test_official_query_table_stored_and_bicubic_resized():
    """``pos_table="official"``: the query gets the stored (G·G, c) table, resized
    bicubically to the map (oracle: the Keys kernel written out here, fp64)."""
    import math

    from mmlayers.adapters.skip_sync import SkipSynchronizer

    def w(t):
        t = abs(t)
        return (1.25 * t ** 3 - 2.25 * t ** 2 + 1 if t <= 1
                else -0.75 * t ** 3 + 3.75 * t ** 2 - 6 * t + 3 if t < 2 else 0.0)

    def bicubic(maps, size):  # (c, G, G) -> (c, size, size)
        c, g, _ = maps.shape
        out = torch.zeros(c, size, size, dtype=torch.float64)
        for i in range(size):
            for j in range(size):
                sy, sx = (i + 0.5) * g / size - 0.5, (j + 0.5) * g / size - 0.5
                y0, x0 = math.floor(sy), math.floor(sx)
                for m in range(-1, 3):
                    for n in range(-1, 3):
                        yy, xx = min(max(y0 + m, 0), g - 1), min(max(x0 + n, 0), g - 1)
                        out[:, i, j] += w(sy - y0 - m) * w(sx - x0 - n) * maps[:, yy, xx]
        return out

    blk = SkipSynchronizer(channels=8, value_dim=6, size=4, grid_size=(4, 4), dim=8, heads=2,
                           points=2, level_sizes=(4, 2), pos_table="official").double()
    assert blk.state_dict()["pos_embed"].shape == (16, 8)
    stored = torch.randn(16, 8, dtype=torch.float64)
    blk.load_state_dict({**blk.state_dict(), "pos_embed": stored})
    seen = []
    blk.sync.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    values = blk.project_values(torch.randn(1, 1, 20, 6, dtype=torch.float64))
    maps = stored.float().double().T.reshape(8, 4, 4)
    for size in (4, 2, 3):
        x = torch.randn(1, 8, size, size, dtype=torch.float64)
        with torch.no_grad():
            blk(x, values, torch.tensor([True]))
            base = blk.query_norm(x.flatten(2).transpose(1, 2))
        want = maps if size == 4 else bicubic(maps, size)
        got = (seen[-1] - base)[0].T.reshape(8, size, size)
        torch.testing.assert_close(got, want, rtol=0, atol=3e-6)
    with pytest.raises(ValueError, match="pos_table must be 'exact' or 'official', got 'yx'"):
        SkipSynchronizer(channels=8, value_dim=6, size=4, grid_size=(4, 4), pos_table="yx")
    with pytest.raises(ValueError, match=r"square grid_size, got \(4, 2\)"):
        SkipSynchronizer(channels=8, value_dim=6, size=4, grid_size=(4, 2), pos_table="official")


def test_for_unet_passes_official_table_option():
    unet = tiny_unet()
    sync = UNetSynchronizer.for_unet(unet, pos_table="official", **SYNC)
    keys = [k for k in sync.state_dict() if k.endswith("pos_embed")]
    assert len(keys) == len(sync.down) + 1
    assert not any(k.endswith("pos_embed") for k in UNetSynchronizer.for_unet(unet, **SYNC)
                   .state_dict())
