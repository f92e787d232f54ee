"""build_on_meta / parameter_report: meta sizes equal real sizes; the paper shapes."""

from __future__ import annotations

import time

import pytest
import torch

from mmlayers.models import MMInterleaved, MMInterleavedConfig, build_on_meta, parameter_report
from mmlayers.models.memory import PARTS


def _llama_params(c: dict) -> int:
    """Llama parameters from its config: embeddings + untied head + per layer (q, k, v, o,
    gate/up/down MLP, two RMSNorms) + final norm (no biases)."""
    d, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * i + 2 * d
    return 2 * v * d + n * per_layer + d


def test_tiny_report_matches_real_model():
    cfg = MMInterleavedConfig.tiny(vocab_size=40)
    torch.manual_seed(0)
    real = MMInterleaved.from_config(cfg)
    meta = build_on_meta(cfg)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    rep_real, rep_meta = parameter_report(real), parameter_report(meta)
    assert rep_meta == rep_real
    total = sum(p.numel() for p in real.parameters())
    trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert rep_meta["total"]["total"] == total
    assert rep_meta["total"]["trainable"] == trainable
    assert rep_meta["other"]["total"] == 0
    assert sum(rep_meta[k]["total"] for k in PARTS) == total
    assert rep_meta["llm"]["total"] == _llama_params(cfg.llm.config)
    assert rep_meta["vae"]["total"] == 0        # pixel space
    assert rep_meta["total"]["bytes"] == 4 * total


def test_paper_shapes_on_meta():
    cfg = MMInterleavedConfig.paper_13b_shapes()
    paper = MMInterleavedConfig.paper_13b("/a", "/b", "/c")
    # every setting but the paths / random-init shapes is paper_13b's
    for part in ("tokens", "loss"):
        assert getattr(cfg, part) == getattr(paper, part)
    for part, skip in (("llm", {"path", "config"}), ("vision", {"path", "config"}),
                       ("decoder", {"path", "unet", "vae", "scheduler"})):
        a, b = getattr(cfg, part).__dict__, getattr(paper, part).__dict__
        assert {k: v for k, v in a.items() if k not in skip} == \
               {k: v for k, v in b.items() if k not in skip}
    t0 = time.perf_counter()
    model = build_on_meta(cfg, dtype=torch.bfloat16)
    assert time.perf_counter() - t0 < 60
    rep = parameter_report(model)
    llm = _llama_params(cfg.llm.config)
    assert 12.9e9 < llm < 13.1e9
    assert rep["llm"] == {"total": llm, "trainable": 0, "bytes": 2 * llm}
    assert model.sync_handle.layer_indices == tuple(range(0, 40, 4))
    assert len(model.llm_sync.blocks) == 10
    # ViT and VAE frozen, UNet and every adapter trained
    assert rep["vit"]["trainable"] == 0 and rep["vit"]["total"] > 3e8
    assert rep["vae"]["trainable"] == 0 and rep["vae"]["total"] > 8e7
    assert rep["unet"]["trainable"] == rep["unet"]["total"] > 8.6e8
    for part in ("llm_synchronizers", "image_tokens", "pyramid_resampler", "context_encoder",
                 "unet_synchronizers"):
        assert rep[part]["trainable"] == rep[part]["total"] > 0, part
    assert rep["image_tokens"]["total"] == 2 * 5120 + 5120 + 2 * 5120 + 2
    assert [f["size"] for f in model.visual.feature_info] == [(64, 64), (32, 32), (16, 16), (8, 8)]


def test_paths_are_sized_from_config_files(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPConfig, CLIPVisionConfig, LlamaConfig

    tiny = MMInterleavedConfig.tiny(vocab_size=40)
    LlamaConfig(**{k: v for k, v in tiny.llm.config.items() if k != "model_type"}
                ).save_pretrained(tmp_path / "llm")
    vis = {k: v for k, v in tiny.vision.config.items() if k != "model_type"}
    CLIPConfig(vision_config=CLIPVisionConfig(**vis).to_dict()).save_pretrained(tmp_path / "clip")
    UNet2DConditionModel(**tiny.decoder.unet).save_config(tmp_path / "sd" / "unet")
    cfg = MMInterleavedConfig.from_dict(tiny.to_dict())
    cfg.llm.path, cfg.vision.path, cfg.decoder.path = (str(tmp_path / "llm"),
                                                       str(tmp_path / "clip"),
                                                       str(tmp_path / "sd"))
    assert parameter_report(build_on_meta(cfg)) == parameter_report(build_on_meta(tiny))
    cfg.llm.path = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="config.json"):
        build_on_meta(cfg)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        parameter_report("model")
    with pytest.raises(TypeError, match="dtype"):
        build_on_meta(MMInterleavedConfig.tiny(vocab_size=40), dtype="bf16")
