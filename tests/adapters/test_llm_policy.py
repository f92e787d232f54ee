"""Training policy of the LLM adapters: trainable sets, groups, checkpointing, save/load."""

import pytest
import torch
import transformers as tf

from mmlayers.adapters.image_tokens import ImageTokens
from mmlayers.adapters.llm import attach_synchronizers
from mmlayers.adapters.policy import (
    load_adapter,
    parameter_groups,
    prepare_for_training,
    save_adapter,
    trainable_parameters,
)

SYNC = {"value_dim": 8, "heads": 2, "points": 2, "level_sizes": (4, 2), "base_size": 2}
S = 20


def llama(layers=2):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    return tf.LlamaForCausalLM(cfg).double()


def setup(model):
    handle = attach_synchronizers(model, every=1, **SYNC)
    tokens = ImageTokens(hidden_size=32, soi_id=40, image_id=41, tokens_per_image=2,
                         dtype=torch.float64).attach(model)
    with torch.no_grad():
        for i, block in enumerate(handle.blocks.values()):
            block.gate.fill_(0.5 + i)
    ids = torch.tensor([[1, 7, 40, 41, 41, 9, 12], [1, 8, 9, 40, 41, 41, 3]])
    feats = torch.randn(2, 1, S, 8, dtype=torch.float64)
    vis = (ids == 41).cumsum(1)[..., None] > 0
    return handle, tokens, ids, feats, vis


def loss_of(model, tokens, ids, feats, vis, handle):
    with handle.vision(feats, vis):
        emb = tokens.embed(ids, torch.randn(2, 2, 32, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(3)))
        loss = model(inputs_embeds=emb, labels=ids).loss
        loss.backward()
    return loss


def test_gradients_reach_only_adapter_parameters():
    model = llama()
    handle, tokens, ids, feats, vis = setup(model)
    named = prepare_for_training(model, handle, tokens)
    assert all(not p.requires_grad for p in model.parameters())
    loss_of(model.train(), tokens, ids, feats, vis, handle)
    assert all(p.grad is None for p in model.parameters())
    for name, p in named.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert len(named) == len(list(handle.adapter.parameters())) + 4


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = llama()
        handle, tokens, ids, feats, vis = setup(model)
        named = prepare_for_training(model, handle, tokens)
        if ckpt:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        loss_of(model.train(), tokens, ids, feats, vis, handle)
        grads.append({k: p.grad.clone() for k, p in named.items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-10, atol=1e-12)


def test_parameter_groups_follow_the_paper():
    model = llama()
    handle, tokens, *_ = setup(model)
    named = prepare_for_training(model, handle, tokens)
    groups = parameter_groups(named, lr=1e-4, weight_decay=0.05)
    where = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert set(where) == set(named)
    b = "synchronizers.blocks.0."
    assert where[b + "sync.sampling_offsets.weight"] == pytest.approx((1e-5, 0.05))
    assert where[b + "sync.sampling_offsets.bias"] == pytest.approx((1e-5, 0.0))
    assert where[b + "gate"] == (1e-4, 0.0)
    assert where[b + "query_norm.weight"] == (1e-4, 0.0)
    assert where[b + "sync.value_proj.weight"] == (1e-4, 0.05)
    assert where["image_tokens.input_rows"] == (1e-4, 0.05)
    assert where["image_tokens.head.bias"] == (1e-4, 0.0)
    opt = torch.optim.AdamW(groups)
    assert len(opt.param_groups) == len(groups)


def test_save_load_round_trip(tmp_path):
    model = llama()
    handle, tokens, ids, feats, vis = setup(model)
    with torch.no_grad():
        for p in trainable_parameters(handle, tokens).values():
            p.add_(0.01 * torch.randn_like(p))
        with handle.vision(feats, vis):
            ref = model(inputs_embeds=tokens.embed(ids, torch.ones(2, 2, 32, dtype=torch.float64))
                        ).logits
    save_adapter(tmp_path, handle, tokens)
    fresh = llama()
    base_keys = list(fresh.state_dict())
    handle2, tokens2 = load_adapter(tmp_path, fresh)
    assert list(fresh.state_dict()) == base_keys
    with torch.no_grad(), handle2.vision(feats, vis):
        out = fresh(inputs_embeds=tokens2.embed(ids, torch.ones(2, 2, 32, dtype=torch.float64))
                    ).logits
    assert torch.equal(out, ref)
    handle2.remove()
    tokens2.remove()
    wider = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match="hidden_size 32"):
        load_adapter(tmp_path, wider)

