"""MMInterleaved: label rules in the text loss, image-loss rules against a hand-wired oracle,
a training step that learns, save/load, paper preset from local directories, generation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mmlayers.adapters.diffusion_objective import diffusion_loss
from mmlayers.data import Document, InterleavedCollator, render_shapes, word_level_tokenizer
from mmlayers.data.shapes import ShapeAttributes
from mmlayers.models import MMInterleaved, MMInterleavedConfig

K = 4  # visual tokens per image




def micro_config(vocab_size: int) -> MMInterleavedConfig:
    """The tiny preset, shrunk further for tests."""
    cfg = MMInterleavedConfig.tiny(vocab_size=vocab_size)
    cfg.llm.config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    cfg.vision.num_tokens = K
    cfg.vision.resampler_depth = 1
    cfg.decoder.unet.update(block_out_channels=[16, 32, 32], cross_attention_dim=32,
                            attention_head_dim=4)
    cfg.decoder.context_hidden = 32
    cfg.decoder.context_queries = 6
    return cfg


def shape_image(color: str, shape: str, position: str = "left") -> torch.Tensor:
    from mmlayers.data import image_to_tensor

    x0 = {"left": 2, "centre": 13, "right": 23}[position]
    return image_to_tensor(render_shapes([(ShapeAttributes(color, shape, position, "small"),
                                           x0, 13)]))


@pytest.fixture(scope="module")
def tok():
    return word_level_tokenizer(["a red green blue circle square triangle now the same in "
                                 "on left right ."])


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = MMInterleaved.from_config(micro_config(len(tok)), tokenizer=tok).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make the UNet synchronizers matter (they start at zero)
        for blk in [*m.unet_sync.down, m.unet_sync.mid]:
            blk.conv.weight.copy_(torch.randn(blk.conv.weight.shape, generator=g) * 0.3)
        for name, mod in m.unet.named_modules():   # and the context (zero-init cross-attn)
            if name.endswith("attn2"):
                w = mod.to_out[0].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    return m


def docs():
    a, b = shape_image("red", "circle"), shape_image("blue", "square", "right")
    c, d = shape_image("green", "triangle"), shape_image("red", "triangle")
    return [Document(["a red circle.", a], caption_first=True),          # row 0: image 0
            Document([b, "a blue square."]),                              # row 1: image 1
            Document(["a green triangle.", c, "now the same triangle in red.", d],
                     prompt_items=1)]                                     # row 2: images 2, 3


@pytest.fixture(scope="module")
def batch(tok):
    return InterleavedCollator(tokenizer=tok, num_image_tokens=K, max_length=64, pack=False)(docs())


def expected_labels(tok) -> list[list[int]]:
    """DESIGN.md §2 by hand: pad, <image>, <s>, <s>→<soi>, prompt and caption-first text
    are ignored; <soi> after text and </s> are trained."""
    def w(text):
        return tok(text, add_special_tokens=False)["input_ids"]
    no, soi, eos = -100, 4, 2
    img = [no] * K
    row0 = [no] + [no] * len(w("a red circle.")) + [soi] + img + [eos]
    row1 = [no, no] + img + w("a blue square.") + [eos]
    row2 = ([no] + [no] * len(w("a green triangle.")) + [soi] + img
            + w("now the same triangle in red.") + [soi] + img + [eos])
    n = max(map(len, (row0, row1, row2)))
    return [r + [no] * (n - len(r)) for r in (row0, row1, row2)]


def test_text_loss_is_ce_over_the_rule_targets(model, batch, tok):
    want = torch.tensor(expected_labels(tok))
    assert torch.equal(batch.labels, want)
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(0))
    logp = out.logits.float().log_softmax(-1)
    terms = [-logp[r, t - 1, want[r, t]] for r in range(want.shape[0])
             for t in range(1, want.shape[1]) if want[r, t] != -100]
    hand = torch.stack(terms).mean()
    assert out.num_text_targets == len(terms)
    torch.testing.assert_close(out.text_loss, hand, rtol=1e-5, atol=1e-6)
    everything = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                 batch.input_ids[:, 1:].flatten())
    assert abs(everything.item() - hand.item()) > 1e-3   # the rules change the number
    torch.testing.assert_close(out.loss, 1.0 * out.text_loss + 10.0 * out.image_loss)


def test_image_loss_against_hand_wired_oracle(model, batch):
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(3))
        assert out.image_losses[1].item() == 0.0                      # only <s><soi>
        assert bool((out.image_losses[[0, 2, 3]] > 0).all())
        torch.testing.assert_close(out.image_loss, out.image_losses.sum() / 4)
        # oracle: spans <s> … <soi> by hand, previous image of image 3 is image 2
        vis = model.encode_images(batch.images)
        hidden, _ = model._run_llm(batch.input_ids, batch.attention_mask, vis,
                                   batch.image_row, batch.images_per_row)
        soi = (batch.input_ids == 4).nonzero().tolist()               # (row, pos) × 4
        spans = [hidden[r, :p + 1] for r, p in soi]
        sel = [0, 2, 3]
        s = max(spans[i].shape[0] for i in sel)
        ctx = torch.stack([F.pad(spans[i], (0, 0, 0, s - spans[i].shape[0])) for i in sel])
        pad = torch.stack([torch.arange(s) >= spans[i].shape[0] for i in sel])
        ehs = model.context_encoder(ctx, pad)
        feats = vis.unet_features[0]

        def oracle(prev_of_3):
            pyr = torch.stack([feats[0], feats[0], feats[prev_of_3]])
            return diffusion_loss(model.unet, model.scheduler, encoder_hidden_states=ehs,
                                  images=batch.images[sel] * 2 - 1, synchronizer=model.unet_sync,
                                  pyramid=pyr, has_image=torch.tensor([False, False, True]),
                                  generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(out.image_losses[sel], oracle(2), rtol=1e-5, atol=1e-6)
        assert (out.image_losses[3] - oracle(0)[2]).abs() > 1e-5      # wrong source differs


def test_context_less_images_get_no_loss_and_no_unet_gradient(model, tok):
    b = InterleavedCollator(tokenizer=tok, num_image_tokens=K, max_length=64)(
        [Document([shape_image("red", "circle"), "a red circle."])])
    model.zero_grad(set_to_none=True)
    out = model(b, generator=torch.Generator().manual_seed(0))
    assert out.image_loss.item() == 0.0 and out.image_losses.tolist() == [0.0]
    out.loss.backward()
    assert all(p.grad is None for p in model.unet.parameters())
    assert model.image_tokens.head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_context_reduction_option(model, batch):
    cfg = dataclasses.replace(model.config.loss, image_reduction="context")
    old, model.config.loss = model.config.loss, cfg
    try:
        with torch.no_grad():
            out = model(batch, generator=torch.Generator().manual_seed(3))
    finally:
        model.config.loss = old
    torch.testing.assert_close(out.image_loss, out.image_losses.sum() / 3)


def test_training_steps_reduce_the_loss(tok, batch):
    torch.manual_seed(0)
    m = MMInterleaved.from_config(micro_config(len(tok)), tokenizer=tok)
    opt = torch.optim.AdamW(m.parameter_groups(lr=3e-3, unet_lr=3e-3, offset_lr=3e-4), lr=3e-3)

    def eval_loss():
        m.eval()
        with torch.no_grad():
            out = m(batch, generator=torch.Generator().manual_seed(5))
        m.train()
        return out
    before = eval_loss()
    for step in range(8):
        out = m(batch, generator=torch.Generator().manual_seed(100 + step))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    after = eval_loss()
    assert after.loss < 0.8 * before.loss
    assert after.text_loss < 0.8 * before.text_loss
    assert after.image_loss < before.image_loss


def test_parameter_groups(model):
    groups = model.parameter_groups(lr=1.0, unet_lr=0.5, offset_lr=0.25, weight_decay=0.1)
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert by_name["unet.conv_in.weight"] == (0.5, 0.1)
    assert by_name["unet.conv_in.bias"] == (0.5, 0.0)
    offs = [n for n in by_name if "sampling_offsets" in n]
    assert offs and all(by_name[n][0] == 0.25 for n in offs)
    gates = [n for n in by_name if n.endswith("gate")]
    assert gates and all(by_name[n] == (1.0, 0.0) for n in gates)
    assert len(by_name) == sum(p.requires_grad for p in model.parameters())
    ctx = model.parameter_groups(lr=1.0, unet_lr=0.5, offset_lr=0.25,
                                 prefix_lrs={"context_encoder.": 0.125})
    by_name = {n: g["lr"] for g in ctx for n in g["names"]}
    assert by_name["context_encoder.proj.weight"] == 0.125 and by_name["unet.conv_in.weight"] == 0.5


def test_detach_context_stops_the_image_loss_at_the_llm(model, batch):
    """decoder.detach_context: the diffusion loss trains the context encoder and the UNet but
    sends nothing into the LLM (its text loss still does)."""
    before = model.config.decoder.detach_context
    model.config.decoder.detach_context = True
    try:
        model.zero_grad(set_to_none=True)
        model(batch, generator=torch.Generator().manual_seed(0)).image_loss.backward()
        assert all(p.grad is None for p in model.llm.parameters())
        assert model.context_encoder.proj.weight.grad.abs().sum() > 0
        model.zero_grad(set_to_none=True)
        model.config.decoder.detach_context = False
        model(batch, generator=torch.Generator().manual_seed(0)).image_loss.backward()
        assert model.llm.get_input_embeddings().weight.grad.abs().sum() > 0
    finally:
        model.config.decoder.detach_context = before
        model.zero_grad(set_to_none=True)


def test_save_load_gives_identical_loss(model, batch, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = MMInterleaved.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = model(batch, generator=torch.Generator().manual_seed(9))
        b = loaded(batch, generator=torch.Generator().manual_seed(9))
    assert a.loss.item() == b.loss.item() and a.image_loss.item() == b.image_loss.item()
    assert loaded.tokenizer.convert_ids_to_tokens([4, 5]) == ["<soi>", "<image>"]


def test_config_round_trip_and_errors(tmp_path):
    cfg = MMInterleavedConfig.tiny(vocab_size=33)
    cfg.save(tmp_path / "c.json")
    assert MMInterleavedConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown llm keys"):
        MMInterleavedConfig.from_dict({"llm": {"sync_evry": 2}})
    with pytest.raises(ValueError, match="model_type"):
        MMInterleaved.from_config({"llm": {"config": {"hidden_size": 8}}})


def test_paper_preset_from_local_directories(tok, batch, tmp_path):
    """paper_13b wiring (paths, freezing, partial save) with tiny stand-ins on disk."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=4, num_attention_heads=4)).save_pretrained(
        tmp_path / "llm")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, image_size=56, patch_size=14)
                    ).save_pretrained(tmp_path / "vit")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
                         attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D",
                                                                 "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
                         ).save_pretrained(tmp_path / "sd" / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  layers_per_block=1, norm_num_groups=4, sample_size=16,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "sd" / "vae")
    DDPMScheduler().save_pretrained(tmp_path / "sd" / "scheduler")
    cfg = MMInterleavedConfig.paper_13b(str(tmp_path / "llm"), str(tmp_path / "vit"),
                                        str(tmp_path / "sd"))
    cfg.tokens = micro_config(len(tok)).tokens
    cfg.vision = dataclasses.replace(cfg.vision, num_tokens=K, resampler_dim=32,
                                     resampler_depth=2, resampler_heads=4)
    cfg.llm = dataclasses.replace(cfg.llm, sync_dim=32, sync_heads=4, sync_points=2)
    cfg.decoder = dataclasses.replace(cfg.decoder, image_size=16, context_hidden=32,
                                      context_heads=4, sync_dim=16, sync_heads=2, sync_points=2)
    m = MMInterleaved.from_config(cfg, tokenizer=tok).eval()
    assert m.sync_handle.layer_indices == (0,)                       # every 4th of 4 layers
    assert not any(p.requires_grad for p in m.llm.parameters())
    assert not any(p.requires_grad for p in m.visual.vit.parameters())
    assert not any(p.requires_grad for p in m.vae.parameters())
    assert all(p.requires_grad for p in m.unet.parameters())
    assert [f["size"] for f in m.visual.feature_info] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    with torch.no_grad():
        a = m(batch, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(a.loss) and a.image_loss > 0
    m.save_pretrained(tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith(("llm.", "visual.vit.", "vae.")) for k in keys)
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("llm_sync.") for k in keys)
    loaded = MMInterleaved.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        b = loaded(batch, generator=torch.Generator().manual_seed(2))
    assert a.loss.item() == b.loss.item()


def test_generation_helpers(model, tok):
    imgs = torch.stack([shape_image("red", "circle"), shape_image("blue", "square")])
    caps = model.caption(imgs, max_new_tokens=5)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    src_a, src_b = shape_image("green", "circle"), shape_image("red", "square", "right")
    prompts = ["a red circle on the left.",
               ["a green circle.", src_a, "now the same circle in red."],
               ["a green circle.", src_b, "now the same circle in red."]]

    def gen(p):
        return model.generate_images(p, num_inference_steps=3, guidance_scale=2.0,
                                     generator=torch.Generator().manual_seed(0))
    out = gen(prompts)
    assert out.shape == (3, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(gen(prompts[:1]), out[:1], rtol=0, atol=1e-5)  # row-independent
    assert (out[1] - out[2]).abs().max() > 1e-3          # the source image matters
    with pytest.raises(ValueError, match="images must be a"):
        model.caption(imgs[0])


def test_tiny_unet_starts_blind_to_the_context(tok):
    """zero_init_cross_attention: every attn2 output projection is 0, so the UNet's output
    does not depend on the context at init (and the option is off for loaded UNets)."""
    from mmlayers.models.builders import zero_cross_attention

    torch.manual_seed(0)
    m = MMInterleaved.from_config(micro_config(len(tok)), tokenizer=tok).eval()
    attn2 = [mod for n, mod in m.unet.named_modules() if n.endswith("attn2")]
    assert attn2 and all(a.to_out[0].weight.abs().sum() == 0 for a in attn2)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        a = m.unet(x, t, encoder_hidden_states=torch.randn(2, 6, 32)).sample
        b = m.unet(x, t, encoder_hidden_states=torch.randn(2, 6, 32)).sample
    assert torch.equal(a, b)
    assert zero_cross_attention(m.unet) == len(attn2)
    assert MMInterleavedConfig.paper_13b("l", "v", "s").decoder.zero_init_cross_attention is False


def test_llm_gradient_checkpointing_keeps_the_images(tok, batch):
    # backward() runs after the synchronizers' image context has closed; the recomputed
    # layers must still read the images (else torch.utils.checkpoint raises)
    grads = []
    for ckpt in (False, True):
        cfg = micro_config(len(tok))
        cfg.llm.gradient_checkpointing = ckpt
        cfg.llm.freeze = False
        torch.manual_seed(0)
        model = MMInterleaved.from_config(cfg, tokenizer=tok).train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("gate"):
                    p.fill_(0.5)
        model(batch, generator=torch.Generator().manual_seed(0)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("llm.") for n in grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_resize_in_half_precision_on_cpu():
    from mmlayers.models.mm_interleaved import _resize

    x = torch.rand(2, 3, 16, 16)
    want = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    for dtype in (torch.bfloat16, torch.float16):
        got = _resize(x.to(dtype), (8, 8))
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-2)


def test_sync_previous_image_switch_hides_the_previous_image(tok, batch):
    """decoder.sync_previous_image=False (the ablation): with sync_no_image="zero" the UNet
    synchronizers add nothing, so they get no gradient; with the paper's setting they do."""
    grads = {}
    for flag in (True, False):
        cfg = micro_config(len(tok))
        cfg.decoder.sync_no_image = "zero"
        cfg.decoder.sync_previous_image = flag
        torch.manual_seed(0)
        m = MMInterleaved.from_config(cfg, tokenizer=tok)
        m(batch, generator=torch.Generator().manual_seed(0)).image_loss.backward()
        grads[flag] = sum(float(p.grad.abs().sum()) for p in m.unet_sync.parameters()
                          if p.grad is not None)
    assert grads[True] > 0 and grads[False] == 0


def test_official_module_options_build_and_run(tok, batch):
    """Q-Former resamplers and official position tables selected by config: the model
    builds with them, saves their stored tables and runs a training forward."""
    from mmlayers.layers.qformer import QFormerResampler

    cfg = micro_config(len(tok))
    cfg.vision.resampler = "qformer"
    cfg.vision.pos_table = "official"
    cfg.decoder.context_resampler = "qformer"
    cfg.decoder.sync_pos_table = "official"
    torch.manual_seed(0)
    m = MMInterleaved.from_config(cfg, tokenizer=tok)
    assert isinstance(m.visual.resampler, QFormerResampler)
    assert isinstance(m.context_encoder.resampler, QFormerResampler)
    keys = m.state_dict().keys()
    assert {"visual.pos_embed", "visual.pyramid.pos_table", "unet_sync.mid.pos_embed"} <= keys
    out = m(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    assert MMInterleavedConfig.from_dict(cfg.to_dict()).decoder.sync_pos_table == "official"


def test_image_context_rule_reaches_the_loss(model, batch, monkeypatch):
    """LossConfig.image_context_rule selects the rule image_contexts applies in forward."""
    import mmlayers.models.mm_interleaved as mmi

    real, seen = mmi.image_contexts, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("rule"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mmi, "image_contexts", spy)
    old = model.config.loss
    try:
        for rule in ("official", "content"):
            model.config.loss = dataclasses.replace(old, image_context_rule=rule)
            with torch.no_grad():
                model(batch, generator=torch.Generator().manual_seed(0))
    finally:
        model.config.loss = old
    assert seen == ["official", "content"]
