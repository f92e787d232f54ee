import pytest
import torch
from einops import rearrange
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTModel,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from mmlayers.layers.hf_vit import ViTBackbone
from mmlayers.layers.posembed import sincos_2d
from mmlayers.layers.pyramid import SimpleFeaturePyramid, ViTAdapterPyramid, split_depth

FAMILIES = {
    "clip": (CLIPVisionConfig, CLIPVisionModel, 1),
    "siglip": (SiglipVisionConfig, SiglipVisionModel, 0),
    "vit": (ViTConfig, ViTModel, 1),
    "deit": (DeiTConfig, DeiTModel, 2),  # CLS + distillation token
    "dinov2_reg": (Dinov2WithRegistersConfig, Dinov2WithRegistersModel, 5),  # CLS + 4 registers
}


def tiny_vit(family="clip", *, image_size=32, patch_size=8, layers=4):
    torch.manual_seed(0)
    cfg_cls, model_cls, _ = FAMILIES[family]
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shapes_feature_info_and_identity_at_init(family):
    vit = tiny_vit(family)
    pyramid = ViTAdapterPyramid.from_vit(vit, inplanes=8)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = pyramid(x, vit)
        bare = vit(pixel_values=x).last_hidden_state
    prefix = FAMILIES[family][2]
    assert ViTBackbone(vit).num_prefix_tokens == prefix
    assert out.last_hidden_state.shape == (2, prefix + 16, 32)
    assert [tuple(m.shape) for m in out.levels] == [(2, 32, 16, 16), (2, 32, 8, 8),
                                                    (2, 32, 4, 4), (2, 32, 2, 2)]
    assert pyramid.feature_info == [
        {"num_chs": 32, "reduction": 4, "size": (16, 16)},
        {"num_chs": 32, "reduction": 8, "size": (8, 8)},
        {"num_chs": 32, "reduction": 16, "size": (4, 4)},
        {"num_chs": 32, "reduction": 32, "size": (2, 2)},
    ]
    # zero-initialised injectors: the ViT computes exactly what it computes alone
    torch.testing.assert_close(out.last_hidden_state, bare, rtol=0, atol=1e-6)
    # ... and a non-zero injector scale does change it (the test above can fail)
    with torch.no_grad():
        pyramid.interactions[0].injector.gamma.fill_(0.5)
        moved = pyramid(x, vit).last_hidden_state
    assert (moved - bare).abs().max() > 1e-3


def test_groups_follow_depth():
    assert split_depth(24, 4) == [(0, 6), (6, 12), (12, 18), (18, 24)]  # ViT-L/14 in the paper
    assert split_depth(6, 4) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert split_depth(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    pyramid = ViTAdapterPyramid.from_vit(tiny_vit(layers=6), inplanes=8)
    assert pyramid.interaction_indexes == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert [len(b.extractors) for b in pyramid.interactions] == [1, 1, 1, 3]
    two = ViTAdapterPyramid.from_vit(tiny_vit(layers=6), inplanes=8,
                                     interaction_indexes=[(0, 1), (1, 6)])
    assert len(two.interactions) == 2


def test_layer_groups_run_every_layer_once():
    vit = tiny_vit(layers=6)
    pyramid = ViTAdapterPyramid.from_vit(vit, inplanes=8, interaction_indexes=[(0, 1), (1, 6)])
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, layer in enumerate(ViTBackbone(vit).layers)]
    with torch.no_grad():
        pyramid(torch.rand(1, 3, 32, 32), vit)
    for h in handles:
        h.remove()
    assert calls == [0, 1, 2, 3, 4, 5]


def test_gradients_reach_adapter_not_frozen_vit():
    vit = tiny_vit("clip").requires_grad_(False)
    pyramid = ViTAdapterPyramid.from_vit(vit, inplanes=8)
    with torch.no_grad():  # let the injector pass gradient into its attention too
        for block in pyramid.interactions:
            block.injector.gamma.fill_(0.1)
    out = pyramid(torch.rand(2, 3, 32, 32), vit)
    (sum(m.square().mean() for m in out.levels) + out.last_hidden_state.square().mean()).backward()
    assert all(p.grad is None for p in vit.parameters())
    for name, p in pyramid.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert pyramid.spm.stem[0].weight.grad.abs().sum() > 0
    assert pyramid.interactions[0].injector.attn.value_proj.weight.grad.abs().sum() > 0
    assert pyramid.interactions[-1].extractors[2].ffn.fc1.weight.grad.abs().sum() > 0


def test_grad_checkpointing_gives_same_values_and_grads():
    vit = tiny_vit("clip").requires_grad_(False)
    pyramid = ViTAdapterPyramid.from_vit(vit, inplanes=8)
    with torch.no_grad():
        pyramid.interactions[1].injector.gamma.fill_(0.2)
    x = torch.rand(2, 3, 32, 32)
    results = []
    for enable in (False, True):
        pyramid.zero_grad()
        out = pyramid.set_grad_checkpointing(enable)(x, vit)
        (out.levels[0].square().mean() + out.last_hidden_state.square().mean()).backward()
        results.append((out.levels[0].detach(), {n: p.grad.clone() for n, p in pyramid.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)


def test_fixed_sincos_per_level():
    vit = tiny_vit()
    torch.manual_seed(1)
    with_pe = ViTAdapterPyramid.from_vit(vit, inplanes=8)
    without = ViTAdapterPyramid.from_vit(vit, inplanes=8, pos_embed=False)
    without.load_state_dict(with_pe.state_dict())
    assert not any("pos_embed" in k for k in with_pe.state_dict())  # fixed, not saved
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a, b = with_pe(x, vit).levels, without(x, vit).levels
    for level, (h, w) in zip(range(4), [(16, 16), (8, 8), (4, 4), (2, 2)], strict=True):
        want = rearrange(sincos_2d(h, w, 32, base_size=(4, 4)), "(H W) d -> 1 d H W", H=h)
        torch.testing.assert_close(a[level] - b[level], want, rtol=0, atol=1e-5)


def test_odd_grid_and_patch16():
    vit = tiny_vit("vit", image_size=24, patch_size=8)  # 3x3 grid: c4 is ceil(3/2) = 2
    pyramid = ViTAdapterPyramid.from_vit(vit, inplanes=8)
    with torch.no_grad():
        out = pyramid(torch.rand(1, 3, 24, 24), vit)
    assert [tuple(m.shape[-2:]) for m in out.levels] == [(12, 12), (6, 6), (3, 3), (2, 2)]


def test_bad_inputs():
    vit = tiny_vit()
    pyramid = ViTAdapterPyramid.from_vit(vit, inplanes=8)
    with pytest.raises(ValueError, match=r"is 28x28 px but the ViT expects 32x32 \(4x4 patches of 8x8\)"):
        pyramid(torch.rand(1, 3, 28, 28), vit)
    with pytest.raises(ValueError, match="has 1 channels but the ViT expects 3"):
        pyramid(torch.rand(1, 1, 32, 32), vit)
    with pytest.raises(ValueError, match=r"must have shape \(b, c, H, W\), got \(3, 32, 32\)"):
        pyramid(torch.rand(3, 32, 32), vit)
    with pytest.raises(ValueError, match=r"built for a ViT with .* = \(32, 4, \(4, 4\)\), .* has \(32, 6"):
        pyramid(torch.rand(1, 3, 32, 32), tiny_vit(layers=6))
    with pytest.raises(TypeError, match="cannot drive Sequential"):
        pyramid(torch.rand(1, 3, 32, 32), nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        ViTAdapterPyramid.from_vit("openai/clip-vit-large-patch14")
    with pytest.raises(ValueError, match="cannot split a ViT of depth 2 into 4 interaction groups"):
        ViTAdapterPyramid.from_vit(tiny_vit(layers=2))
    with pytest.raises(ValueError, match="contiguous half-open ranges covering layers 0..3"):
        ViTAdapterPyramid.from_vit(vit, interaction_indexes=[(0, 2), (3, 4)])


def test_simple_feature_pyramid():
    torch.manual_seed(0)
    fpn = SimpleFeaturePyramid(32, grid_size=(4, 4), out_dim=16)
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    levels = fpn(x)
    assert [tuple(m.shape) for m in levels] == [(2, 16, 16, 16), (2, 16, 8, 8),
                                                (2, 16, 4, 4), (2, 16, 2, 2)]
    assert [(f["num_chs"], f["reduction"], f["size"]) for f in fpn.feature_info] == [
        (16, 4, (16, 16)), (16, 8, (8, 8)), (16, 16, (4, 4)), (16, 32, (2, 2))]
    sum(m.sum() for m in levels).backward()
    assert x.grad.abs().sum() > 0
    # the fixed sincos table is the only difference pos_embed makes
    plain = SimpleFeaturePyramid(32, grid_size=(4, 4), out_dim=16, pos_embed=False)
    plain.load_state_dict(fpn.state_dict())
    with torch.no_grad():
        diff = fpn(x)[1] - plain(x)[1]
    want = rearrange(sincos_2d(8, 8, 16, base_size=(4, 4)), "(H W) d -> 1 d H W", H=8)
    torch.testing.assert_close(diff, want.expand_as(diff), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"x must have shape \(b, 32, 4, 4\), got \(2, 32, 5, 5\)"):
        fpn(torch.randn(2, 32, 5, 5))
    with pytest.raises(ValueError, match=r"scales must be a non-empty subset of .* got \(3,\)"):
        SimpleFeaturePyramid(32, grid_size=(4, 4), scales=(3,))


def _bicubic_fp64(maps, size):
    """Independent bicubic (Keys a = -0.75, half-pixel, edge clamp) of (d, G, G) in fp64."""
    import math

    def w(t):
        t = abs(t)
        return (1.25 * t ** 3 - 2.25 * t ** 2 + 1 if t <= 1
                else -0.75 * t ** 3 + 3.75 * t ** 2 - 6 * t + 3 if t < 2 else 0.0)

    d, g, _ = maps.shape
    out = torch.zeros(d, size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            sy, sx = (i + 0.5) * g / size - 0.5, (j + 0.5) * g / size - 0.5
            y0, x0 = math.floor(sy), math.floor(sx)
            for m in range(-1, 3):
                for n in range(-1, 3):
                    yy, xx = min(max(y0 + m, 0), g - 1), min(max(x0 + n, 0), g - 1)
                    out[:, i, j] += w(sy - y0 - m) * w(sx - x0 - n) * maps[:, yy, xx]
    return out


@pytest.mark.parametrize("cls", ["adapter", "simple"])
def test_official_stored_table_is_resized_per_level(cls):
    vit = tiny_vit()
    torch.manual_seed(1)
    if cls == "adapter":
        off = ViTAdapterPyramid.from_vit(vit, inplanes=8, pos_table="official").double()
        bare = ViTAdapterPyramid.from_vit(vit, inplanes=8, pos_embed=False).double()

        def run(p, x):
            return p(x, vit.double()).levels
        x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    else:
        off = SimpleFeaturePyramid(32, grid_size=(4, 4), pos_table="official").double()
        bare = SimpleFeaturePyramid(32, grid_size=(4, 4), pos_embed=False).double()

        def run(p, x):
            return p(x)
        x = torch.randn(1, 32, 4, 4, dtype=torch.float64)
    # a persistent (H·W, d) buffer: saved and loadable like the official pos_embed
    assert off.state_dict()["pos_table"].shape == (16, 32)
    stored = torch.randn(16, 32, dtype=torch.float64)
    state = {**bare.state_dict(), "pos_table": stored}
    off.load_state_dict(state)
    with torch.no_grad():
        a, b = run(off, x), run(bare, x)
    maps = rearrange(stored.float().double(), "(H W) d -> d H W", H=4)
    for level, size in zip(range(4), [16, 8, 4, 2], strict=True):
        want = maps if size == 4 else _bicubic_fp64(maps, size)
        torch.testing.assert_close(a[level][0] - b[level][0], want, rtol=0, atol=3e-6)


def test_official_table_default_values_and_spm_eps():
    vit = tiny_vit()
    p = ViTAdapterPyramid.from_vit(vit, inplanes=8, pos_table="official", spm_eps=1e-6)
    # [y | x] halves: row i, column j = (1, 2) -> first half encodes y = 1, second x = 2
    omega = 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)
    want = torch.cat([torch.sin(1 * omega), torch.cos(1 * omega),
                      torch.sin(2 * omega), torch.cos(2 * omega)])
    torch.testing.assert_close(p.pos_table[1 * 4 + 2].double(), want, rtol=0, atol=1e-6)
    eps = {m.eps for m in p.spm.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {1e-6}
    assert {m.eps for m in ViTAdapterPyramid.from_vit(vit, inplanes=8).spm.modules()
            if isinstance(m, nn.LayerNorm)} == {1e-5}
    with pytest.raises(ValueError, match="pos_table must be 'exact' or 'official', got 'x'"):
        ViTAdapterPyramid.from_vit(vit, inplanes=8, pos_table="x")
    with pytest.raises(ValueError, match="norm_eps must be a positive number, got 0"):
        ViTAdapterPyramid.from_vit(vit, inplanes=8, spm_eps=0)


@pytest.mark.parametrize("groups,ends", [(4, [1, 2, 3, 4]), (2, [2, 2, 4, 4])])
def test_level_values_add_the_vit_maps(groups, ends):
    """Level i = adapter map i + the ViT map after the block ending quarter i+1, bilinearly
    resized. The ViT maps come from the ViT's own ``hidden_states`` (zero injectors: the
    ViT computes exactly what it computes alone); the adapter maps are read off the spatial
    prior, the up-conv and the last interaction block."""
    vit = tiny_vit("clip")
    pyramid = ViTAdapterPyramid.from_vit(vit, inplanes=8, pos_embed=False,
                                         num_interactions=groups)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    seen = {}
    hooks = [pyramid.spm.register_forward_hook(lambda m, a, o: seen.update(c1=o[0])),
             pyramid.up.register_forward_hook(lambda m, a, o: seen.update(up=o)),
             pyramid.interactions[-1].register_forward_hook(lambda m, a, o: seen.update(c=o[1]))]
    with torch.no_grad():
        levels = pyramid(x, vit).levels
        states = vit(pixel_values=x, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    c2, c3, c4 = (rearrange(p, "b (H W) d -> b d H W", H=s) for p, s in
                  zip(seen["c"].split([64, 16, 4], dim=1), (8, 4, 2), strict=True))
    adapter = [seen["c1"] + seen["up"], c2, c3, c4]
    for i, (size, end) in enumerate(zip((16, 8, 4, 2), ends, strict=True)):
        vit_map = rearrange(states[end][:, 1:], "b (H W) d -> b d H W", H=4)
        want = adapter[i] + nn.functional.interpolate(vit_map, size=(size, size),
                                                       mode="bilinear", align_corners=False)
        assert vit_map.abs().amax() > 0.1
        torch.testing.assert_close(levels[i], want, rtol=1e-5, atol=1e-5, msg=f"level {i}")
