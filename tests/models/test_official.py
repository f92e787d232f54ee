"""Loading an official-layout MM-Interleaved checkpoint.

A tiny model with the official modules is built from local component directories and
given random weights; the test writes them out under the official key names and shapes
(the official module tree: ``mm_decoder``, ``text_decoder.head`` + ``head_new``,
``visual_tokenizer`` with its 1 + G² position table and ``adapter_*`` names, MMFS modules
with ignore slots and ``ignore_token``, ``image_decoder.decoder.mmfs_module``), by a
mapping written here independently of the converter. ``from_official`` must give back
exactly the same weights and the same losses, and generate.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from einops import rearrange

from mmlayers.data import Document, InterleavedCollator, render_shapes, word_level_tokenizer
from mmlayers.data.shapes import ShapeAttributes
from mmlayers.models import MMInterleaved, TokenConfig, convert_official_state_dict
from mmlayers.models.official import official_config, read_checkpoint

K = 4
V_OFF = "visual_tokenizer.encoder.vision_model."


def shape_image(color, shape, position="left"):
    from mmlayers.data import image_to_tensor

    x0 = {"left": 2, "right": 23}[position]
    return image_to_tensor(render_shapes([(ShapeAttributes(color, shape, position, "small"),
                                           x0, 13)]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    tok = word_level_tokenizer(["a red blue circle square now the same in ."])
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=4, num_attention_heads=4)).save_pretrained(
        root / "llm")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                     num_attention_heads=4, image_size=56, patch_size=14)
                    ).save_pretrained(root / "vit")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                         attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D",
                                                                 "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
                         ).save_pretrained(root / "sd" / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  layers_per_block=1, norm_num_groups=4, sample_size=16,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "sd" / "vae")
    DDPMScheduler().save_pretrained(root / "sd" / "scheduler")
    dirs = {"llm": str(root / "llm"), "vit": str(root / "vit"), "sd": str(root / "sd")}
    cfg = official_config(**dirs, tokens=TokenConfig())
    cfg.llm.sync_layers, cfg.llm.sync_points = [0, 2], 2
    v = cfg.vision
    v.num_tokens, v.resampler_dim, v.resampler_depth, v.resampler_heads = K, 32, 2, 4
    v.resampler_kwargs = {"mlp_dim": 48}
    v.pyramid_kwargs = {**v.pyramid_kwargs, "inplanes": 8}
    dc = cfg.decoder
    dc.image_size, dc.context_queries, dc.context_hidden = 16, 6, 32
    dc.sync_dim, dc.sync_points = 32, 2
    torch.manual_seed(1)
    model = MMInterleaved.from_config(cfg, tokenizer=tok).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.startswith(("llm.", "visual.vit.", "vae.", "unet.")) \
                    or name == "visual.pyramid.pos_table":
                continue
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
        model.visual.pyramid.pos_table.copy_(model.visual.pos_embed)  # one official table
        bias = model.image_tokens.head.bias  # multiples of 1/64: b + 100 - 100 is exact
        bias.copy_((bias * 64).round() / 64)
    return tok, dirs, model, to_official(model.state_dict(), g)


def _mmfs_to_official(sd, ours, off, heads, levels, g):
    out = {}
    for k in ("sampling_offsets", "value_proj", "output_proj"):
        for s in ("weight", "bias"):
            out[f"{off}{k}.{s}"] = sd[f"{ours}{k}.{s}"]
    for s in ("weight", "bias"):
        out[f"{off}dynamic_offset_mask.{s}"] = sd[f"{ours}query_proj.{s}"]
        a = sd[f"{ours}attention_weights.{s}"]
        a = rearrange(a, "(h l p) ... -> h l p ...", h=heads, l=levels)
        slot = torch.randn((*a.shape[:2], 1, *a.shape[3:]), generator=g)  # ignored officially
        out[f"{off}attention_weights.{s}"] = torch.cat([a, slot], 2).flatten(0, 2)
    out[off + "query_relpos.weight"] = sd[ours + "query_relpos.weight"]
    out[off + "ignore_token"] = torch.zeros(1, 1, 1, sd[ours + "value_proj.weight"].shape[0])
    return out


def to_official(sd, g):
    """Our state dict → the official key names and shapes (independent of the converter)."""
    off = {}
    vocab, d = sd["llm.lm_head.weight"].shape
    for k, t in sd.items():
        if k == "llm.model.embed_tokens.weight":
            off["mm_decoder.embed_tokens.weight"] = torch.cat([t, sd["image_tokens.input_rows"]])
        elif k.startswith("llm.model."):
            off["mm_decoder." + k[len("llm.model."):]] = t
        elif m := re.fullmatch(r"llm_sync\.blocks\.(\d+)\.(gate|query_norm\.weight|"
                               r"vision_norm\.weight)", k):
            name = {"gate": "gate", "query_norm.weight": "norm1.weight",
                    "vision_norm.weight": "norm2.weight"}[m.group(2)]
            off[f"mm_decoder.layers.{m.group(1)}.llama_cross_attn.{name}"] = t
        elif m := re.fullmatch(r"visual\.vit\.model\.(.*)", k):
            if not m.group(1).startswith("post_layernorm"):  # official: Identity
                off[V_OFF + m.group(1)] = t
        elif m := re.fullmatch(r"visual\.pyramid\.(.*)", k):
            rest = m.group(1)
            rest = re.sub(r"^spm\.proj\.(\d)", lambda x: f"spm.fc{int(x.group(1)) + 1}", rest)
            rest = re.sub(r"extractors\.(\d+)\.", lambda x: "extractor." if x.group(1) == "0"
                          else f"extra_extractors.{int(x.group(1)) - 1}.", rest)
            rest = rest.replace("ffn.dwconv.", "ffn.dwconv.dwconv.")
            if rest == "pos_table":
                continue
            rest = {"level_embed": "level_embed"}.get(rest, rest)
            rest = re.sub(r"^(spm|interactions|up|level_embed)", lambda x: "adapter_" + x.group(1)
                          if x.group(1) != "spm" else "adapter_spm", rest)
            off[V_OFF + rest] = t
        elif k == "visual.pos_embed":
            off["visual_tokenizer.pos_embed"] = torch.cat([torch.zeros(1, t.shape[1]), t])
        elif m := re.fullmatch(r"visual\.(pos_proj|pos_norm|post_norm)\.(.*)", k):
            name = {"pos_proj": "pos_proj", "pos_norm": "pos_ln", "post_norm": "post_ln"}
            off[f"visual_tokenizer.{name[m.group(1)]}.{m.group(2)}"] = t
        elif m := re.fullmatch(r"visual\.resampler\.proj\.(.*)", k):
            off["visual_tokenizer.proj." + m.group(1)] = t
        elif m := re.fullmatch(r"visual\.resampler\.(.*)", k):
            off["visual_tokenizer.perceiver_resampler." + m.group(1)] = t
        elif m := re.fullmatch(r"context_encoder\.resampler\.(.*)", k):
            off["image_decoder.perceiver_resampler." + m.group(1)] = t
        elif m := re.fullmatch(r"context_encoder\.proj\.(.*)", k):
            off["context_feat_proj." + m.group(1)] = t
        elif k == "context_encoder.negative_embedding":
            off["image_decoder.neg_prompt_embeds"] = t[None]
        elif k == "image_tokens.soi_vector":
            off["soi_token"] = t[None]
        elif m := re.fullmatch(r"(unet|vae)\.(.*)", k):
            off[f"image_decoder.decoder.{m.group(1)}.{m.group(2)}"] = t
        elif m := re.fullmatch(r"unet_sync\.(down\.\d+|mid)\.(pos_embed|query_norm\..*|"
                               r"value_norm\..*|conv\..*)", k):
            blk = ("mmfs_mid_block" if m.group(1) == "mid"
                   else "mmfs_down_blocks." + m.group(1).split(".")[1])
            off[f"image_decoder.decoder.mmfs_module.{blk}."
                + m.group(2).replace("value_norm", "feat_norm")] = t
    # synchronizers: 16 heads; LLM 3 levels, UNet 4
    for i in sorted({int(m.group(1)) for k in sd if (m := re.match(r"llm_sync\.blocks\.(\d+)\.", k))}):
        off.update(_mmfs_to_official(sd, f"llm_sync.blocks.{i}.sync.",
                                     f"mm_decoder.layers.{i}.llama_cross_attn.attn.", 16, 3, g))
    blocks = sorted({m.group(1) for k in sd if (m := re.match(r"unet_sync\.(down\.\d+|mid)\.", k))})
    for b in blocks:
        name = "mmfs_mid_block" if b == "mid" else "mmfs_down_blocks." + b.split(".")[1]
        off.update(_mmfs_to_official(sd, f"unet_sync.{b}.sync.",
                                     f"image_decoder.decoder.mmfs_module.{name}.mmfs.", 16, 4, g))
    # text head: frozen head (new rows 0, bias -100, as officially) + trainable head_new
    off["text_decoder.head.weight"] = torch.cat([sd["llm.lm_head.weight"], torch.zeros(2, d)])
    off["text_decoder.head.bias"] = torch.cat([torch.zeros(vocab), torch.full((2,), -100.0)])
    off["text_decoder.head_new.weight"] = sd["image_tokens.head.weight"]
    off["text_decoder.head_new.bias"] = sd["image_tokens.head.bias"] + 100.0
    # buffers the official model also saves, and an unused Q-Former text-branch FFN
    off["visual_tokenizer.clip_mean"] = torch.rand(1, 3, 1, 1)
    off["visual_tokenizer.clip_std"] = torch.rand(1, 3, 1, 1)
    off[V_OFF + "embeddings.position_ids"] = torch.arange(17)[None]
    q = "visual_tokenizer.perceiver_resampler.blip2qformer.encoder.layer.0."
    off[q + "intermediate.dense.weight"] = torch.randn(48, 32)
    off[q + "output.dense.weight"] = torch.randn(32, 48)
    return off


def batch(tok):
    a, b = shape_image("red", "circle"), shape_image("blue", "square", "right")
    docs = [Document(["a red circle.", a]), Document(["a blue square.", b, "now the same in red.", a])]
    return InterleavedCollator(tokenizer=tok, num_image_tokens=K, max_length=64, pack=False)(docs)


def test_converted_keys_are_exactly_the_models(setup):
    _, _, model, off = setup
    # the official layout holds what the official tree holds
    assert "mm_decoder.layers.2.llama_cross_attn.attn.dynamic_offset_mask.weight" in off
    assert V_OFF + "adapter_interactions.3.extra_extractors.1.ffn.dwconv.dwconv.weight" in off
    assert off["visual_tokenizer.pos_embed"].shape == (17, 32)
    conv = convert_official_state_dict(off)
    own = model.state_dict()
    assert set(conv) == set(own) - {"visual.vit.model.post_layernorm.weight",
                                     "visual.vit.model.post_layernorm.bias"}
    for k, t in conv.items():
        assert torch.equal(t, own[k]), k


def test_from_official_same_weights_losses_and_generation(setup, tmp_path):
    tok, dirs, model, off = setup
    torch.save(off, tmp_path / "pytorch_model.bin")
    loaded = MMInterleaved.from_official(tmp_path, **dirs, tokens=TokenConfig(), image_size=16,
                                         tokenizer=tok).eval()
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    assert loaded.config.llm.sync_layers == [0, 2]
    assert loaded.config.vision.resampler == "qformer" and loaded.config.vision.num_tokens == K
    b = batch(tok)
    with torch.no_grad():
        a = model(b, generator=torch.Generator().manual_seed(0))
        c = loaded(b, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(a.loss) and a.loss.item() == c.loss.item()
    caps = loaded.caption(shape_image("red", "circle")[None], max_new_tokens=3)
    assert len(caps) == 1 and isinstance(caps[0], str)
    img = loaded.generate_images(["a red circle."], num_inference_steps=2, guidance_scale=2.0,
                                 generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    as64 = MMInterleaved.from_official(off, **dirs, tokens=TokenConfig(), image_size=16,
                                       dtype=torch.float64)
    assert as64.visual.pos_embed.dtype == torch.float64
    assert torch.equal(as64.visual.pos_embed, mine["visual.pos_embed"].double())


def test_sharded_safetensors_with_index(setup, tmp_path):
    from safetensors.torch import save_file

    off = {k: v.contiguous() for k, v in setup[3].items()}
    keys = sorted(off)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: off[k].clone() for k in ks}, str(tmp_path / name))
    index = {"weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    read = read_checkpoint(tmp_path)
    assert set(read) == set(off) and all(torch.equal(read[k], off[k]) for k in off)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="lists model-00002-of-00002.safetensors"):
        read_checkpoint(tmp_path)


def test_bad_checkpoints_name_the_problem(setup, tmp_path):
    tok, dirs, model, off = setup
    (tmp_path / "broken.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint file .*broken.bin"):
        read_checkpoint(tmp_path / "broken.bin")
    truncated = {k: v for k, v in off.items() if not k.startswith(
        "image_decoder.decoder.mmfs_module.mmfs_mid_block.conv.")}
    with pytest.raises(ValueError, match=r"model key\(s\) the checkpoint does not provide: "
                                         r"\['unet_sync.mid.conv.bias'"):
        MMInterleaved.from_official(truncated, **dirs, tokens=TokenConfig(), image_size=16)
    with pytest.raises(ValueError, match=r"map to nothing in mmlayers: \['image_tokens"):
        convert_official_state_dict({**off, **{k: v for k, v in model.state_dict().items()
                                              if k.startswith("image_tokens")}})
    with pytest.raises(ValueError, match="ignore_token is not all zeros"):
        key = "mm_decoder.layers.0.llama_cross_attn.attn.ignore_token"
        convert_official_state_dict({**off, key: torch.ones_like(off[key])})
    with pytest.raises(ValueError, match=r"pos_embed row 0 \(CLS\) is not zero"):
        table = off["visual_tokenizer.pos_embed"].clone()
        table[0, 0] = 1.0
        convert_official_state_dict({**off, "visual_tokenizer.pos_embed": table})
    wrong = dict(off)
    wrong["context_feat_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"shape mismatch.*context_encoder.proj.weight: "
                                         r"checkpoint \(3, 3\), model \(64, 64\)"):
        MMInterleaved.from_official(wrong, **dirs, tokens=TokenConfig(), image_size=16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nothing.bin")
    with pytest.raises(TypeError, match="mapping of names to tensors"):
        convert_official_state_dict([1, 2])


def test_convert_official_recipe_round_trip(setup, tmp_path):
    """recipes/convert_official.py writes a save_pretrained directory that reloads to the
    same model (the tokenizer of the LLM directory, if any, gains <soi> / <image>)."""
    import importlib.util
    from pathlib import Path

    tok, dirs, model, off = setup
    torch.save(off, tmp_path / "official.bin")
    path = Path(__file__).resolve().parents[2] / "recipes" / "convert_official.py"
    spec = importlib.util.spec_from_file_location("convert_official", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = recipe.main(["--checkpoint", str(tmp_path / "official.bin"), "--llm", dirs["llm"],
                       "--vit", dirs["vit"], "--sd", dirs["sd"], "--out", str(tmp_path / "out"),
                       "--image-size", "16"])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no tokenizer dir
    loaded = MMInterleaved.from_pretrained(out)
    theirs = loaded.state_dict()
    for k, t in model.state_dict().items():
        assert torch.equal(theirs[k], t), k
    # no tokenizer in the LLM directory: the official ids <soi> 32000, <image> 32001
    assert loaded.config.tokens.soi_id == 32000 and loaded.config.vision.pos_table == "official"
    with pytest.raises(SystemExit, match="exists and is not empty"):
        recipe.main(["--checkpoint", "x", "--llm", dirs["llm"], "--vit", dirs["vit"],
                     "--sd", dirs["sd"], "--out", out])


def test_official_preset_differs_from_paper_preset_only_where_documented():
    from mmlayers.models import MMInterleavedConfig

    paper = MMInterleavedConfig.paper_13b("l", "v", "s").to_dict()
    official = MMInterleavedConfig.official_13b("l", "v", "s").to_dict()
    diff = {f"{part}.{k}": (paper[part][k], official[part][k]) for part in paper
            if isinstance(paper[part], dict) for k in paper[part]
            if paper[part][k] != official[part][k]}
    assert diff == {
        "llm.sync_dim": (1024, None),                       # the ViT width
        "vision.resampler": ("perceiver", "qformer"),
        "vision.pos_table": ("exact", "official"),
        "vision.pyramid_kwargs": ({}, {"spm_eps": 1e-6}),
        "decoder.context_resampler": ("perceiver", "qformer"),
        "decoder.sync_pos_table": ("exact", "official"),
        "decoder.context_pos_table": ("exact", "official"),
        "loss.image_context_rule": ("content", "official"),
    }


def test_stored_tables_of_another_grid_load_and_are_resized(setup):
    """The official visual tokenizer keeps a 16 x 16 table whatever the ViT's grid (here
    4 x 4); the UNet blocks' tables may also be of another grid: they load and are resized
    (bicubic, float32) where used."""
    import torch.nn.functional as F

    from mmlayers.layers.posembed import official_sincos_2d

    tok, dirs, model, off = setup
    big = official_sincos_2d(16, 32, prefix_rows=1)
    unet_key = "image_decoder.decoder.mmfs_module.mmfs_mid_block.pos_embed"
    unet_big = torch.randn(12 * 12, off[unet_key].shape[1])
    m = MMInterleaved.from_official({**off, "visual_tokenizer.pos_embed": big, unet_key: unet_big},
                                    **dirs, tokens=TokenConfig(), image_size=16).eval()
    assert m.visual.pos_embed.shape == (256, 32) and m.visual.pyramid.pos_table.shape == (256, 32)
    assert torch.equal(m.unet_sync.mid.pos_embed, unet_big)
    hidden = torch.zeros(1, 17, 32)
    grid = big[1:].reshape(1, 16, 16, 32).permute(0, 3, 1, 2)
    small = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    want_pos = torch.cat([torch.zeros(1, 32), small.permute(0, 2, 3, 1).reshape(16, 32)])
    with torch.no_grad():
        base = m.visual.pos_norm(m.visual.pos_proj(hidden))
        want = m.visual.post_norm(base + want_pos)
        torch.testing.assert_close(m.visual.resampler_context(hidden), want, rtol=0, atol=1e-6)
        b = batch(tok)
        assert torch.isfinite(m(b, generator=torch.Generator().manual_seed(0)).loss)
    with pytest.raises(ValueError, match="shape mismatch"):  # not square: refused
        MMInterleaved.from_official({**off, "visual_tokenizer.pos_embed": big[:200]}, **dirs,
                                    tokens=TokenConfig(), image_size=16)


def test_llm_synchronizer_conversion_agrees_with_load_official_state_dict(setup):
    """Two routes for one official MMFS module: the model-level converter and the layer's
    own loader give the same weights."""
    import copy

    _, _, model, off = setup
    prefix = "mm_decoder.layers.2.llama_cross_attn.attn."
    sync = copy.deepcopy(model.llm_sync.blocks["2"].sync)
    with torch.no_grad():
        for p in sync.parameters():
            p.zero_()
    sync.load_official_state_dict(off, prefix=prefix)
    conv = convert_official_state_dict(off)
    for k, t in sync.state_dict().items():
        assert torch.equal(t, conv["llm_sync.blocks.2.sync." + k]), k
