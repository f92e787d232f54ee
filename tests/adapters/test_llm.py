"""attach_synchronizers on tiny Llama, Mistral, Qwen2, GPT-2 and GPT-NeoX models."""

import pytest
import torch
import transformers as tf

from mmlayers.adapters.llm import attach_synchronizers
from mmlayers.layers.visibility import image_visibility

SYNC = {"value_dim": 8, "heads": 2, "points": 2, "level_sizes": (4, 2), "base_size": 2}
S = 20  # 4² + 2²
BOS, SOI, IMG = 1, 5, 6


def tiny(family: str, layers: int = 3, dtype=torch.float64):
    torch.manual_seed(0)
    common = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": layers,
              "num_attention_heads": 4, "intermediate_size": 48, "bos_token_id": BOS,
              "eos_token_id": 2, "pad_token_id": 0}
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=2))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, num_key_value_heads=2,
                                                       head_dim=8))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2))
    elif family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=layers,
                                                 n_head=4, n_positions=64, bos_token_id=BOS,
                                                 eos_token_id=2, pad_token_id=0))
    elif family == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common))
    else:
        raise KeyError(family)
    return model.to(dtype).eval()


def set_gates(handle, value=0.7):
    with torch.no_grad():
        for block in handle.blocks.values():
            block.gate.fill_(value)


def prompt(b=2):
    """Two rows: text, image 0 (2 slots), text, image 1, text; row 1 drops image 1's view."""
    row = [BOS, 9, SOI, IMG, IMG, 10, 11, SOI, IMG, IMG, 12, 13]
    ids = torch.tensor([row] * b)
    vis, _ = image_visibility(ids, soi_id=SOI, image_id=IMG, bos_id=BOS)
    return ids, vis


FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_gate_is_identity_and_remove_restores(family):
    model = tiny(family)
    ids, vis = prompt()
    keys = list(model.state_dict())
    with torch.no_grad():
        base = model(ids).logits
    handle = attach_synchronizers(model, every=2, **SYNC)
    assert handle.layer_indices == (0, 2)
    expected = "after_layer" if family == "gpt_neox" else "after_attention"
    assert handle.placement == expected
    assert list(model.state_dict()) == keys
    feats = torch.randn(2, 2, S, 8, dtype=torch.float64)
    with torch.no_grad(), handle.vision(feats, vis):
        assert torch.equal(model(ids).logits, base)
        set_gates(handle)
        changed = model(ids).logits
    assert (changed - base).abs().max() > 1e-4  # the synchronizers do act once gated
    handle.remove()
    assert list(model.state_dict()) == keys
    with torch.no_grad(), pytest.raises(RuntimeError, match="Expected"):
        with handle.vision(feats, vis):
            assert torch.equal(model(ids).logits, base)  # hooks gone: base model
            raise RuntimeError("Expected")
    assert not handle._stack


@pytest.mark.parametrize("family", FAMILIES)
def test_invisible_images_do_not_change_logits(family):
    model = tiny(family)
    handle = attach_synchronizers(model, every=1, **SYNC)
    set_gates(handle)
    ids, vis = prompt()
    feats = torch.randn(2, 2, S, 8, dtype=torch.float64)
    vis = vis.clone()
    vis[1, :, 1] = False  # row 1 never sees image 1
    poked = feats.clone()
    poked[1, 1] += 5 * torch.randn(S, 8, dtype=torch.float64)
    with torch.no_grad():
        with handle.vision(feats, vis):
            ref = model(ids).logits
        with handle.vision(poked, vis):
            out = model(ids).logits
    assert torch.equal(out[1], ref[1]) and torch.equal(out[0], ref[0])
    # image 1 of row 0 is visible from position 8 on: poking it moves exactly those logits
    poked = feats.clone()
    poked[0, 1] += 5 * torch.randn(S, 8, dtype=torch.float64)
    with torch.no_grad(), handle.vision(poked, vis):
        out = model(ids).logits
    assert torch.equal(out[0, :8], ref[0, :8])
    assert (out[0, 8:] - ref[0, 8:]).abs().amax(-1).min() > 0


def test_after_attention_equals_hand_written_llama_layer():
    model = tiny("llama", layers=1)
    handle = attach_synchronizers(model, every=1, **SYNC)
    set_gates(handle, 0.9)
    block, layer = handle.blocks["0"], model.model.layers[0]
    torch.manual_seed(1)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    feats = torch.randn(2, 2, S, 8, dtype=torch.float64)
    _, vis = prompt()
    pos = torch.arange(12)[None]
    pe = model.model.rotary_emb(x, position_ids=pos)
    kw = {"attention_mask": None, "position_ids": pos, "position_embeddings": pe}
    with torch.no_grad():
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)
        h = x + attn
        sync = block.sync(block.query_norm(h), block.vision_norm(feats), vis)
        h = h + torch.tanh(torch.tensor(0.9, dtype=torch.float64)) * sync
        ref = h + layer.mlp(layer.post_attention_layernorm(h))
        with handle.vision(feats, vis):
            out = layer(x, **kw)
        plain = layer(x, **kw)  # outside the context: the base layer
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert (out - plain).abs().max() > 1e-3


def _count_value_proj(handle):
    calls = []
    hooks = [b.sync.value_proj.register_forward_hook(lambda *a: calls.append(1))
             for b in handle.blocks.values()]
    return calls, hooks


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_generate_cached_equals_uncached_and_projects_values_once(family, monkeypatch):
    import mmlayers.layers.synchronizer as sync_mod

    layouts, tall_layout = [], sync_mod.tall_layout
    monkeypatch.setattr(sync_mod, "tall_layout", lambda *a: layouts.append(1) or tall_layout(*a))
    model = tiny(family)
    handle = attach_synchronizers(model, every=2, **SYNC)
    set_gates(handle, 1.5)
    ids, vis = prompt()
    torch.manual_seed(2)
    feats = 3 * torch.randn(2, 2, S, 8, dtype=torch.float64)
    gen = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    calls, hooks = _count_value_proj(handle)
    with torch.no_grad(), handle.vision(feats, vis):
        cached = model.generate(ids, use_cache=True, **gen)
        n_cached = len(calls)
        uncached = model.generate(ids, use_cache=False, **gen)
        # the decode steps read the last visibility row: check one step at logit level
        full = torch.cat((ids, cached[:, 12:13]), 1)
        step_ref = model(full).logits[:, -1]
    for h in hooks:
        h.remove()
    assert torch.equal(cached, uncached)
    assert n_cached == len(handle.blocks)  # once per prompt, not per step
    assert len(layouts) == len(handle.blocks)  # laid out once for every call in the block
    with torch.no_grad():
        out = model(ids, use_cache=True)
        with handle.vision(feats, vis):
            out = model(ids, use_cache=True)
            step = model(cached[:, 12:13], cache=out.past_key_values
                         if hasattr(out, "past_key_values") else out.cache).logits[:, -1]
    torch.testing.assert_close(step, step_ref, rtol=1e-9, atol=1e-9)


def test_beam_search_indexes_values_instead_of_recomputing():
    model = tiny("llama")
    handle = attach_synchronizers(model, every=2, **SYNC)
    set_gates(handle, 1.5)
    ids, vis = prompt()
    vis[0, :, :] = False  # rows differ: beams must read their own row's images
    feats = 3 * torch.randn(2, 2, S, 8, dtype=torch.float64)
    gen = {"max_new_tokens": 4, "num_beams": 3, "num_return_sequences": 2, "do_sample": False,
           "attention_mask": torch.ones_like(ids)}
    calls, hooks = _count_value_proj(handle)
    with torch.no_grad(), handle.vision(feats, vis):
        beams = model.generate(ids, use_cache=True, **gen)
        n_calls = len(calls)
        beams_nc = model.generate(ids, use_cache=False, **gen)
    for h in hooks:
        h.remove()
    assert beams.shape == (4, 16)
    assert torch.equal(beams, beams_nc)
    assert n_calls == len(handle.blocks)
    # row 1 alone, with its own images, gives the same beams as inside the batch
    with torch.no_grad(), handle.vision(feats[1:], vis[1:]):
        alone = model.generate(ids[1:], use_cache=True, **{**gen, "attention_mask":
                                                             torch.ones_like(ids[1:])})
    assert torch.equal(alone, beams[2:])


def test_bad_vision_inputs_raise_before_compute():
    model = tiny("llama")
    handle = attach_synchronizers(model, every=2, **{**SYNC, "max_images": 4})
    ids, vis = prompt()
    good = torch.randn(2, 2, S, 8, dtype=torch.float64)
    cases = [
        (torch.randn(2, 2, S, 7), None, "dv=8"),
        (torch.randn(2, 2, S + 1, 8), None, "s=20"),
        (torch.randn(2, 4, S, 8), None, "max_images=4"),
        (good, vis[:, :, :1], "m=2"),
        (good, vis[:1], "b=2"),
        (good.tolist(), None, "torch.Tensor"),
    ]
    for feats, v, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg), handle.vision(feats, v):
            pass
    with torch.no_grad(), handle.vision(good, vis), pytest.raises(ValueError, match="multiple"):
        model(torch.cat([ids, ids[:1]]))
    with torch.no_grad(), handle.vision(good, vis), pytest.raises(ValueError, match="covers 12"):
        model(ids[:, :5])
    assert not handle._stack
    with pytest.raises(ValueError, match="placement"):
        attach_synchronizers(model, placement="inside", **SYNC)
    with pytest.raises(ValueError, match="hook_points"):
        attach_synchronizers(tiny("gpt_neox"), placement="after_attention", **SYNC)
    with pytest.raises(ValueError, match="layers_path"):
        attach_synchronizers(model, layers_path="model.nope", **SYNC)


def test_nested_contexts_innermost_wins():
    model = tiny("llama")
    handle = attach_synchronizers(model, every=1, **SYNC)
    set_gates(handle)
    ids, vis = prompt()
    a, b = torch.randn(2, 2, S, 8, dtype=torch.float64), torch.randn(2, 2, S, 8, dtype=torch.float64)
    with torch.no_grad():
        with handle.vision(a, vis):
            ref_a = model(ids).logits
        with handle.vision(b, vis):
            ref_b = model(ids).logits
        with handle.vision(a, vis):
            with handle.vision(b, vis):
                assert torch.equal(model(ids).logits, ref_b)
            assert torch.equal(model(ids).logits, ref_a)
    assert not handle._stack


def test_layers_path_and_explicit_layers():
    model = tiny("llama", layers=4)
    handle = attach_synchronizers(model, layers=[1, 3], layers_path="model.layers", **SYNC)
    assert handle.layer_indices == (1, 3) and sorted(handle.blocks) == ["1", "3"]
    handle.remove()
    paper = attach_synchronizers(tiny("llama", layers=40 // 8), every=4, **SYNC)
    assert paper.layer_indices == (0, 4)
