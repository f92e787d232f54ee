import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
)

from mmlayers.layers.posembed import sincos_2d
from mmlayers.vision import CLIP_MEAN, CLIP_STD, VisualTokenizer, flatten_levels

VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
       "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
SMALL = {"llm_dim": 48, "num_tokens": 6, "resampler_dim": 32, "resampler_depth": 2,
         "resampler_heads": 4, "pyramid_kwargs": {"inplanes": 8}}


def clip_vit():
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(**VIT)).eval()


def test_tokens_pyramid_and_level_routing():
    torch.manual_seed(0)
    tok = VisualTokenizer.from_config(CLIPVisionConfig(**VIT), **SMALL)
    out = tok(torch.rand(3, 3, 32, 32))
    assert out.tokens.shape == (3, 6, 48)
    assert out.last_hidden_state.shape == (3, 17, 32)
    assert [tuple(m.shape) for m in out.pyramid] == [(3, 32, 16, 16), (3, 32, 8, 8),
                                                     (3, 32, 4, 4), (3, 32, 2, 2)]
    assert [f["reduction"] for f in tok.feature_info] == [4, 8, 16, 32]
    feats, shapes = out.llm_features
    assert shapes == [(8, 8), (4, 4), (2, 2)] and feats.shape == (3, 64 + 16 + 4, 32)
    # rows first, level by level: element (b, s) is pyramid[1][b, :, s // 8, s % 8]
    torch.testing.assert_close(feats[1, 8 * 3 + 5], out.pyramid[1][1, :, 3, 5])
    torch.testing.assert_close(feats[2, 64 + 4 * 1 + 2], out.pyramid[2][2, :, 1, 2])
    ufeats, ushapes = out.unet_features
    assert ushapes == [(16, 16), (8, 8), (4, 4), (2, 2)] and ufeats.shape == (3, 340, 32)
    custom = VisualTokenizer(clip_vit(), llm_levels=(3,), unet_levels=(0,), **SMALL)
    assert custom(torch.rand(1, 3, 32, 32)).llm_features[1] == [(2, 2)]


def test_normalisation_and_resampler_input_without_pyramid():
    vit = clip_vit()
    tok = VisualTokenizer(vit, pyramid=None, **SMALL)
    images = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = tok(images)
        bare = vit(pixel_values=(images - mean) / std).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state, bare, rtol=0, atol=1e-6)
    assert out.pyramid == [] and tok.feature_info == []
    # other statistics give other tokens
    other = VisualTokenizer(vit, pyramid=None, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, **SMALL)
    other.load_state_dict(tok.state_dict())
    with torch.no_grad():
        assert (other(images).tokens - out.tokens).abs().max() > 1e-6


def test_adapter_leaves_vit_output_unchanged_at_init():
    vit = clip_vit()
    with_adapter = VisualTokenizer(vit, **SMALL)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a = with_adapter(images).last_hidden_state
        b = VisualTokenizer(vit, pyramid=None, **SMALL)(images).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_only_adapter_and_resampler_train():
    tok = VisualTokenizer.from_config(CLIPVisionConfig(**VIT), **SMALL)
    names = [n for n, _ in tok.trainable_parameters()]
    assert names and not any(n.startswith("vit.") for n in names)
    assert any(n.startswith("pyramid.") for n in names)
    assert any(n.startswith("resampler.") for n in names)
    assert all(not p.requires_grad for p in tok.vit.parameters())
    out = tok(torch.rand(2, 3, 32, 32))
    (out.tokens.square().sum() + sum(m.square().mean() for m in out.pyramid)).backward()
    assert all(p.grad is None for p in tok.vit.parameters())
    assert tok.resampler.queries.grad.abs().sum() > 0
    assert tok.pos_proj.weight.grad.abs().sum() > 0
    assert tok.pyramid.spm.stem[0].weight.grad.abs().sum() > 0
    tok.freeze_vit(False)
    assert all(p.requires_grad for p in tok.parameters())


def test_output_projection_starts_small():
    tok = VisualTokenizer(clip_vit(), pyramid=None, **{**SMALL, "resampler_dim": 256,
                                                       "resampler_heads": 8})
    assert tok.resampler.proj.weight.std().item() == pytest.approx(1e-3, rel=0.1)


def test_simple_pyramid_and_siglip():
    torch.manual_seed(0)
    tok = VisualTokenizer.from_config(SiglipVisionConfig(**VIT), pyramid="simple",
                                      **{**SMALL, "pyramid_kwargs": None})
    out = tok(torch.rand(2, 3, 32, 32))
    assert tok.vit.num_prefix_tokens == 0
    assert out.last_hidden_state.shape == (2, 16, 32) and out.tokens.shape == (2, 6, 48)
    assert [tuple(m.shape) for m in out.pyramid] == [(2, 32, 16, 16), (2, 32, 8, 8),
                                                     (2, 32, 4, 4), (2, 32, 2, 2)]
    siglip_adapter = VisualTokenizer.from_config(SiglipVisionConfig(**VIT), **SMALL)
    assert siglip_adapter(torch.rand(1, 3, 32, 32)).pyramid[3].shape == (1, 32, 2, 2)


def test_from_pretrained_vit_local_directory(tmp_path):
    vit = clip_vit()
    vit.save_pretrained(tmp_path / "vision")
    torch.manual_seed(1)
    direct = VisualTokenizer(vit, **SMALL).freeze_vit()
    loaded = VisualTokenizer.from_pretrained_vit(str(tmp_path / "vision"), **SMALL)
    assert isinstance(loaded.vit.model, CLIPVisionModel)
    for (n, a), (_, b) in zip(direct.vit.state_dict().items(), loaded.vit.state_dict().items(),
                              strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    new = {k: v for k, v in direct.state_dict().items() if not k.startswith("vit.")}
    missing, unexpected = loaded.load_state_dict(new, strict=False)
    assert not unexpected and all(k.startswith("vit.") for k in missing)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).tokens, direct(images).tokens, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.vit.parameters())


def test_from_pretrained_vit_full_clip_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 50},
                     vision_config=VIT, projection_dim=8)
    full = CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path)
    tok = VisualTokenizer.from_pretrained_vit(str(tmp_path), **SMALL)
    assert isinstance(tok.vit.model, CLIPVisionModel)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = full.vision_model(pixel_values=images).last_hidden_state
        got = tok.vit.model(pixel_values=images).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_inputs():
    tok = VisualTokenizer(clip_vit(), **SMALL)
    with pytest.raises(ValueError, match=r"is 224x224 px but the ViT expects 32x32 \(4x4 patches"):
        tok(torch.rand(1, 3, 224, 224))
    with pytest.raises(ValueError, match="has 4 channels but the ViT expects 3"):
        tok(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="pyramid must be 'adapter', 'simple' or None, got 'fpn'"):
        VisualTokenizer(clip_vit(), **{**SMALL, "pyramid": "fpn"})
    with pytest.raises(ValueError, match=r"llm_levels must index the 4 pyramid levels, got \(4,\)"):
        VisualTokenizer(clip_vit(), llm_levels=(4,), **SMALL)
    with pytest.raises(ValueError, match="image_mean and image_std need 3 values .* got 1 and 3"):
        VisualTokenizer(clip_vit(), image_mean=(0.5,), **SMALL)
    with pytest.raises(TypeError, match="cannot drive Linear"):
        VisualTokenizer(torch.nn.Linear(3, 3), **SMALL)
    out = tok(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"levels \[7\] out of range for a 4-level pyramid"):
        out.flatten([7])
    with pytest.raises(ValueError, match="at least one level"):
        flatten_levels([])


def test_resampler_context_positions():
    tok = VisualTokenizer(clip_vit(), pyramid=None, **SMALL)
    hidden = torch.zeros(1, 17, 32)
    with torch.no_grad():
        ctx = tok.resampler_context(hidden)
    # zero input: pos_norm(pos_proj(0)) is constant per token, so rows differ only by the
    # sincos table; the CLS row gets none
    base = tok.pos_norm(tok.pos_proj(hidden))[0, 0]
    want_cls = tok.post_norm(base)
    want_patch = tok.post_norm(base + sincos_2d(4, 4, 32)[5])
    torch.testing.assert_close(ctx[0, 0], want_cls.detach())
    torch.testing.assert_close(ctx[0, 1 + 5], want_patch.detach())


def test_official_resampler_table_is_stored_and_used():
    tok = VisualTokenizer(clip_vit(), pyramid="adapter", pos_table="official", **SMALL)
    sd = tok.state_dict()
    assert sd["pos_embed"].shape == (16, 32) and sd["pyramid.pos_table"].shape == (16, 32)
    # [y | x]: patch 5 = row 1, column 1 -> both halves equal; patch 6 = row 1, column 2
    omega = 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)
    half = {v: torch.cat([torch.sin(v * omega), torch.cos(v * omega)]) for v in (1, 2)}
    torch.testing.assert_close(tok.pos_embed[6].double(), torch.cat([half[1], half[2]]),
                               rtol=0, atol=1e-6)
    stored = torch.randn(16, 32)
    tok.load_state_dict({**sd, "pos_embed": stored})
    hidden = torch.zeros(1, 17, 32)
    with torch.no_grad():
        ctx = tok.resampler_context(hidden)
        base = tok.pos_norm(tok.pos_proj(hidden))[0, 0]
        torch.testing.assert_close(ctx[0, 1 + 6], tok.post_norm(base + stored[6]))
        torch.testing.assert_close(ctx[0, 0], tok.post_norm(base))
    with pytest.raises(ValueError, match="pos_table must be 'exact' or 'official', got 'yx'"):
        VisualTokenizer(clip_vit(), pyramid=None, pos_table="yx", **SMALL)


def test_qformer_resampler_option():
    from mmlayers.layers.qformer import QFormerResampler

    tok = VisualTokenizer(clip_vit(), pyramid=None, resampler="qformer",
                          resampler_kwargs={"mlp_dim": 40}, **SMALL).eval()
    r = tok.resampler
    assert isinstance(r, QFormerResampler) and r.qk_norm
    cfg = r.blip2qformer.config
    assert (cfg.num_hidden_layers, cfg.cross_attention_frequency, cfg.encoder_hidden_size,
            cfg.intermediate_size) == (2, 2, 32, 40)
    assert 0.5e-3 < r.proj.weight.std().item() < 2e-3  # official 768 -> LLM init, std 1e-3
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = tok(images)
        want = r(tok.resampler_context(out.last_hidden_state))
    assert out.tokens.shape == (2, 6, 48)
    torch.testing.assert_close(out.tokens, want)
    with pytest.raises(ValueError, match="resampler must be 'perceiver' or 'qformer', got 'q'"):
        VisualTokenizer(clip_vit(), pyramid=None, resampler="q", **SMALL)
