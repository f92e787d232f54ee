"""ViTBackbone across Hugging Face vision families: every accepted model reproduces the
model's own ``last_hidden_state`` (the oracle), also when run in layer groups and under a
ViT-Adapter pyramid at init; every family it cannot drive is refused at construction."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from mmlayers.layers.hf_vit import UNSUPPORTED, VERIFIED_TYPES, ViTBackbone
from mmlayers.layers.pyramid import ViTAdapterPyramid
from mmlayers.vision import VisualTokenizer

C = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
         image_size=32, patch_size=8)

SUPPORTED = {
    "clip": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**C)),
    "siglip": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**C)),
    "vit": lambda: tf.ViTModel(tf.ViTConfig(**C)),
    "deit": lambda: tf.DeiTModel(tf.DeiTConfig(**C)),
    "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**C)),
    "beit_absolute": lambda: tf.BeitModel(tf.BeitConfig(
        **C, use_absolute_position_embeddings=True, use_mean_pooling=False)),
    "beit_shared_bias": lambda: tf.BeitModel(tf.BeitConfig(
        **C, use_shared_relative_position_bias=True, use_relative_position_bias=False)),
    "beit_layer_bias": lambda: tf.BeitModel(tf.BeitConfig(**C, use_relative_position_bias=True)),
    "data2vec_shared_bias": lambda: tf.Data2VecVisionModel(tf.Data2VecVisionConfig(
        **C, use_shared_relative_position_bias=True)),
    "data2vec_layer_bias": lambda: tf.Data2VecVisionModel(tf.Data2VecVisionConfig(
        **C, use_relative_position_bias=True)),
    "aimv2": lambda: tf.Aimv2VisionModel(tf.Aimv2VisionConfig(**C)),
    "chinese_clip": lambda: tf.ChineseCLIPVisionModel(tf.ChineseCLIPVisionConfig(**C)),
    "altclip": lambda: tf.AltCLIPVisionModel(tf.AltCLIPVisionConfig(**C)),
    "owlvit": lambda: tf.OwlViTVisionModel(tf.OwlViTVisionConfig(**C)),
}

# accepted after the probe-image check at construction (model types not in VERIFIED_TYPES)
CHECKED = {
    "git": lambda: tf.GitVisionModel(tf.GitVisionConfig(**C)),   # pre- and post-norm
    "ijepa": lambda: tf.IJepaModel(tf.IJepaConfig(**C)),
}

REFUSED = {
    "yolos": (lambda: tf.YolosModel(tf.YolosConfig(**{**C, "image_size": [32, 32]},
                                                   num_detection_tokens=3)),
              "detection tokens come after the patch tokens"),
    "vit_mae": (lambda: tf.ViTMAEModel(tf.ViTMAEConfig(**C, mask_ratio=0.0)),
                "shuffle and drop patches"),
    "mlcd": (lambda: tf.MLCDVisionModel(tf.MLCDVisionConfig(**C)),
             "rotary position_embeddings"),
    "idefics3": (lambda: tf.Idefics3VisionTransformer(tf.Idefics3VisionConfig(**C)),
                 "patch_attention_mask"),
    "swin": (lambda: tf.SwinModel(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16,
                                                depths=[1, 1], num_heads=[2, 2],
                                                window_size=4)),
             "hierarchical"),
}


def build(family):
    torch.manual_seed(0)
    model = {**SUPPORTED, **CHECKED}[family]().double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter matters (bias tables and layer scales start at 0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model


def pixels(b=2, seed=2):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)


@pytest.mark.parametrize("family", sorted(SUPPORTED) + sorted(CHECKED))
def test_backbone_reproduces_the_models_last_hidden_state(family):
    model, x = build(family), pixels()
    vb = ViTBackbone(model)
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state
        got = vb(x)
        grouped = vb.final_norm(vb.run_layers(vb.run_layers(vb.embed(x), 0, 1), 1, None))
    assert vb.grid_size == (4, 4) and got.shape == want.shape
    assert vb.num_prefix_tokens == want.shape[1] - 16
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grouped, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["beit_shared_bias", "beit_layer_bias",
                                    "data2vec_shared_bias", "aimv2"])
def test_adapter_pyramid_at_init_keeps_the_models_features(family):
    model, x = build(family), pixels()
    pyramid = ViTAdapterPyramid.from_vit(model, inplanes=8, num_interactions=3)
    with torch.no_grad():
        out = pyramid(x, model)
        want = model(pixel_values=x).last_hidden_state
    # AIMv2's RMSNorm rounds through float32, so float64 paths agree to float32 precision
    torch.testing.assert_close(out.last_hidden_state, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_families_it_cannot_drive_are_refused_at_construction(family):
    make, reason = REFUSED[family]
    torch.manual_seed(0)
    model = make()
    with pytest.raises(TypeError, match=rf"{type(model).__name__} .*is not supported: .*{reason}"):
        ViTBackbone(model)
    with pytest.raises(TypeError, match="is not supported"):
        VisualTokenizer(model, llm_dim=16, pyramid=None)


def test_every_refused_model_type_has_a_reason():
    assert {"yolos", "vit_mae", "mlcd_vision_model", "idefics3_vision", "swin"} <= set(UNSUPPORTED)
    assert all(len(why) > 20 for why in UNSUPPORTED.values())


def test_verified_types_are_exactly_the_tested_families():
    from test_pyramid import FAMILIES

    types = {f().config.model_type for f in SUPPORTED.values()}
    types |= {model_cls(cfg_cls(**C)).config.model_type for cfg_cls, model_cls, _ in
              FAMILIES.values()}
    assert types == set(VERIFIED_TYPES)
    assert not {f().config.model_type for f in CHECKED.values()} & VERIFIED_TYPES


class ShiftedViT(tf.ViTModel):
    """An unknown family whose output the layers alone do not give (+1 after the norm)."""

    def forward(self, pixel_values=None, **kw):
        out = super().forward(pixel_values=pixel_values, **kw)
        out.last_hidden_state = out.last_hidden_state + 1.0
        return out


def shifted(**kw):
    cfg = tf.ViTConfig(**C)
    cfg.model_type = "shifted_vit"
    return ShiftedViT(cfg, **kw)


def test_unknown_model_is_checked_on_a_probe_image():
    torch.manual_seed(0)
    model = shifted().train()
    with pytest.raises(TypeError, match=r"ShiftedViT \(model_type 'shifted_vit'\) is not "
                                        r"supported: .*differ from its own last_hidden_state"):
        ViTBackbone(model)
    assert model.training  # the check ran in eval mode and restored the mode
    fine = tf.ViTModel(tf.ViTConfig(**C)).train()
    fine.config.model_type = "renamed_vit"   # the same computation under an unknown name
    vb = ViTBackbone(fine)
    assert fine.training and vb.num_prefix_tokens == 1
    with torch.device("meta"):
        on_meta = shifted()
    assert ViTBackbone(on_meta).depth == 3   # nothing to run on the meta device: no check


def test_unknown_model_whose_own_forward_needs_more_is_refused():
    torch.manual_seed(0)
    model = tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**{**C, "num_patches": 16}))
    with pytest.raises(TypeError, match=r"siglip2_vision_model.*cannot be checked: its own "
                                        r"forward\(pixel_values=...\) failed"):
        ViTBackbone(model)
