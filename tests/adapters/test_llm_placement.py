"""Every HOOK_POINTS entry puts the synchronizer between attention and feed-forward.

For each family the expected decoder-layer output is written out by hand from the layer's
own submodules (the paper's formula ``h = x + Attn(x); h = h + tanh(g)·MMFS(h);
out = h + FFN(h)``, with each family's own norm arrangement), and compared with the output
of the layer inside a full model forward with the synchronizers attached.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from mmlayers.adapters.llm import attach_synchronizers
from mmlayers.adapters.llm_layers import HOOK_POINTS, find_decoder_layers
from mmlayers.layers.visibility import image_visibility

SYNC = {"value_dim": 8, "heads": 2, "points": 2, "level_sizes": (4, 2), "base_size": 2,
        "offset_init": 0.5}
S = 20
BOS, SOI, IMG = 1, 5, 6
COMMON = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
          "bos_token_id": BOS, "eos_token_id": 2, "pad_token_id": 0}


def build(family):
    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                n_positions=64))
    if family == "gemma3_text":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**COMMON, head_dim=8,
                                                        sliding_window=4))
    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
           "gemma": "Gemma", "phi3": "Phi3", "gemma2": "Gemma2", "olmo2": "Olmo2"}[family]
    extra = {"head_dim": 8} if family in ("mistral", "qwen3", "gemma", "gemma2") else {}
    cfg = getattr(tf, f"{cls}Config")(**COMMON, **extra)
    return getattr(tf, f"{cls}ForCausalLM")(cfg)


# norm arrangement of each family's decoder layer: names of (pre-attention norm, attention,
# post-attention norm, pre-FFN norm, FFN, post-FFN norm); None where the family has none
LLAMA_LIKE = ("input_layernorm", "self_attn", None, "post_attention_layernorm", "mlp", None)
LAYOUT = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": LLAMA_LIKE,
    "gemma": LLAMA_LIKE, "phi3": LLAMA_LIKE,
    "gpt2": ("ln_1", "attn", None, "ln_2", "mlp", None),
    "gemma2": ("input_layernorm", "self_attn", "post_attention_layernorm",
               "pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
    "gemma3_text": ("input_layernorm", "self_attn", "post_attention_layernorm",
                    "pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
    "olmo2": (None, "self_attn", "post_attention_layernorm", None, "mlp",
              "post_feedforward_layernorm"),
}


def test_every_hook_point_entry_is_tested():
    assert sorted(LAYOUT) == sorted(HOOK_POINTS)


def first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", sorted(LAYOUT))
def test_synchronizer_sits_between_attention_and_feed_forward(family):
    model = build(family).to(torch.float64).eval()
    assert model.config.model_type == family
    handle = attach_synchronizers(model, every=1, **SYNC)
    assert handle.placement == "after_attention"
    with torch.no_grad():
        for i, block in enumerate(handle.blocks.values()):
            block.gate.fill_(0.6 + 0.3 * i)
            block.sync.sampling_offsets.weight.normal_(0, 0.05)  # offsets depend on the query
    row = [BOS, 9, SOI, IMG, IMG, 10, 11, SOI, IMG, IMG, 12, 13]
    ids = torch.tensor([row, row[:6] + [20, 21, 22, 23, 24, 25]])
    vis, _ = image_visibility(ids, soi_id=SOI, image_id=IMG, bos_id=BOS)
    feats = torch.randn(2, 2, S, 8, dtype=torch.float64, generator=torch.Generator()
                        .manual_seed(1)) * 2
    layers = handle.model.model.layers if family != "gpt2" else handle.model.transformer.h
    names = LAYOUT[family]
    seen, attn_calls = {}, {}

    def grab_layer(i):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            seen[i] = (x, first(out))
        return hook

    def grab_attn(i):
        def hook(mod, args, kwargs):
            attn_calls[i] = (args, kwargs)
        return hook

    hooks = [layer.register_forward_hook(grab_layer(i), with_kwargs=True)
             for i, layer in enumerate(layers)]
    hooks += [layer.get_submodule(names[1]).register_forward_pre_hook(grab_attn(i),
                                                                      with_kwargs=True)
              for i, layer in enumerate(layers)]
    with torch.no_grad():
        with handle.vision(feats, vis):
            model(ids, use_cache=False)
        kept = dict(attn_calls)
    for h in hooks:
        h.remove()

    def sub(layer, name, x):
        return x if name is None else first(layer.get_submodule(name)(x))

    with torch.no_grad():
        for i, layer in enumerate(layers):
            x, got = seen[i]
            args, kwargs = kept[i]
            a_in = sub(layer, names[0], x)
            if args:  # GPT-2 passes hidden_states positionally
                attn = first(layer.get_submodule(names[1])(a_in, *args[1:], **kwargs))
            else:
                attn = first(layer.get_submodule(names[1])(**{**kwargs, "hidden_states": a_in}))
            h = x + sub(layer, names[2], attn)
            block = handle.blocks[str(i)]
            sync = block.sync(block.query_norm(h), block.vision_norm(feats), vis)
            h = h + torch.tanh(block.gate) * sync
            want = h + sub(layer, names[5], sub(layer, names[4], sub(layer, names[3], h)))
            assert (torch.tanh(block.gate) * sync).abs().amax() > 1e-3
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def build_after_layer(family):
    torch.manual_seed(0)
    if family == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                              ffn_dim=48, num_attention_heads=4,
                                              max_position_embeddings=64,
                                              word_embed_proj_dim=32))
    if family == "falcon":
        return tf.FalconForCausalLM(tf.FalconConfig(vocab_size=64, hidden_size=32,
                                                    num_hidden_layers=2, num_attention_heads=4))
    if family == "bloom":
        return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2,
                                                  n_head=4))
    if family == "gptj":
        return tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                n_positions=64, rotary_dim=4, bos_token_id=BOS,
                                                eos_token_id=2))
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**COMMON))
    if family == "stablelm":
        return tf.StableLmForCausalLM(tf.StableLmConfig(**COMMON))
    if family == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**COMMON, num_local_experts=4,
                                                      num_experts_per_tok=2, head_dim=8))
    raise KeyError(family)


AFTER_LAYER = ["bloom", "falcon", "gpt_neox", "gptj", "mixtral", "opt", "stablelm"]


@pytest.mark.parametrize("family", AFTER_LAYER)
def test_after_layer_families_add_the_synchronizer_to_the_layer_output(family):
    """Families without hook points: ``out = y + tanh(g)·MMFS(y)`` with ``y`` the bare
    layer's output for the same input and arguments."""
    dtype = torch.float32 if family == "mixtral" else torch.float64  # grouped MoE matmuls
    model = build_after_layer(family).to(dtype).eval()
    assert model.config.model_type not in HOOK_POINTS
    handle = attach_synchronizers(model, every=1, **SYNC)
    assert handle.placement == "after_layer"
    with torch.no_grad():
        for i, block in enumerate(handle.blocks.values()):
            block.gate.fill_(0.6 + 0.3 * i)
            block.sync.sampling_offsets.weight.normal_(0, 0.05)
    row = [BOS, 9, SOI, IMG, IMG, 10, 11, SOI, IMG, IMG, 12, 13]
    ids = torch.tensor([row, row[:6] + [20, 21, 22, 23, 24, 25]])
    vis, _ = image_visibility(ids, soi_id=SOI, image_id=IMG, bos_id=BOS)
    feats = torch.randn(2, 2, S, 8, generator=torch.Generator().manual_seed(1)).to(dtype) * 2
    layers = find_decoder_layers(model)
    calls = {}

    def grab(i):
        def hook(mod, args, kwargs, out):
            calls[i] = (args, kwargs, first(out))
        return hook

    hooks = [layer.register_forward_hook(grab(i), with_kwargs=True)
             for i, layer in enumerate(layers)]
    with torch.no_grad(), handle.vision(feats, vis):
        model(ids, attention_mask=torch.ones_like(ids), use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, layer in enumerate(layers):
            args, kwargs, got = calls[i]
            y = first(layer(*args, **kwargs))   # outside the context: the bare layer
            block = handle.blocks[str(i)]
            sync = torch.tanh(block.gate) * block.sync(block.query_norm(y),
                                                       block.vision_norm(feats), vis)
            assert sync.abs().amax() > 1e-3
            tol = 1e-5 if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(got, y + sync, rtol=tol, atol=tol)
