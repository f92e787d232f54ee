"""<soi>/<image> tokens kept outside the LLM's weights (ImageTokens, add_image_tokens)."""

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from mmlayers.adapters.image_tokens import ImageTokens, add_image_tokens

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(28)]


def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>", pad_token="<pad>")


def llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3)
    return tf.LlamaForCausalLM(cfg).double().eval()


def test_add_image_tokens_keeps_text_generation_and_base_keys():
    tok, model = tokenizer(), llama()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    ids = torch.tensor([tok("<s> w1 w2 w3").input_ids])
    with torch.no_grad():
        base = model(ids).logits
        base_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    tokens = add_image_tokens(tok, model, tokens_per_image=3)
    assert (tokens.soi_id, tokens.image_id) == (32, 33)
    assert tok("w1 <soi><image> w2").input_ids == [5, 32, 33, 6]
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert logits.shape[-1] == 34 and model.config.vocab_size == 34
    assert torch.equal(logits[..., :32], base)
    assert torch.equal(logits[..., 32:], torch.full_like(logits[..., 32:], -100.0))
    assert torch.equal(gen, base_gen)
    tokens.remove()
    assert model.config.vocab_size == 32
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_new_tokens_embed_and_generate_through_the_hooks():
    tok, model = tokenizer(), llama()
    tokens = add_image_tokens(tok, model, tokens_per_image=2)
    with torch.no_grad():
        tokens.soi_vector.normal_()
        tokens.head.bias.fill_(50.0)  # force <soi>/<image> to be generated
    ids = torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert set(out[0, 3:].tolist()) <= {tokens.soi_id, tokens.image_id}
    table = model.get_input_embeddings()
    ids = torch.tensor([[1, 5, tokens.soi_id, tokens.image_id, tokens.image_id, 6]])
    with torch.no_grad():
        emb = table(ids)  # through the hooks
        direct = tokens.embed(ids, torch.zeros(1, 2, 16, dtype=torch.float64))
    torch.testing.assert_close(emb[0, 2], tokens.input_rows[0] + tokens.soi_vector)
    torch.testing.assert_close(emb[0, 3], tokens.input_rows[1])
    assert torch.equal(emb[0, [0, 1, 5]], table.weight[[1, 5, 6]])
    assert torch.equal(direct[0, 3:5], torch.zeros(2, 16, dtype=torch.float64))
    assert torch.equal(direct[0, [0, 1, 2, 5]], emb[0, [0, 1, 2, 5]])


def test_embed_places_visual_tokens_in_reading_order():
    tokens = ImageTokens(hidden_size=4, soi_id=10, image_id=11, tokens_per_image=2)
    table = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, 10, 11, 11, 2, 10, 11, 11], [10, 11, 11, 3, 3, 3, 3, 3]])
    visual = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    emb = tokens.embed(ids, visual, embeddings=table)
    assert torch.equal(emb[0, 2:4], visual[0]) and torch.equal(emb[0, 6:8], visual[1])
    assert torch.equal(emb[1, 1:3], visual[2])
    assert torch.equal(emb[1, 3:], table.weight[3].expand(5, 4))


def test_embed_checks_counts_before_compute():
    tokens = ImageTokens(hidden_size=4, soi_id=10, image_id=11, tokens_per_image=2)
    table = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, 10, 11, 11, 2]])
    with pytest.raises(ValueError, match="2 <image> tokens"):
        tokens.embed(ids, torch.zeros(2, 2, 4), embeddings=table)
    with pytest.raises(ValueError, match="k=2"):
        tokens.embed(ids, torch.zeros(1, 3, 4), embeddings=table)
    with pytest.raises(ValueError, match="d=4"):
        tokens.embed(ids, torch.zeros(1, 2, 5), embeddings=table)
    with pytest.raises(ValueError, match="length k=2"):
        tokens.embed(torch.tensor([[10, 11, 11, 11, 10, 11]]), torch.zeros(2, 2, 4),
                     embeddings=table)
    with pytest.raises(ValueError, match="<soi> followed by"):
        tokens.embed(torch.tensor([[11, 11]]), torch.zeros(1, 2, 4), embeddings=table)
    with pytest.raises(ValueError, match="soi_id and image_id"):
        ImageTokens(hidden_size=4, soi_id=3, image_id=3)


def test_ids_inside_the_base_vocab_overwrite_their_columns():
    model = llama()  # vocab 32; pretend the tokenizer is smaller (padded embedding table)
    tokens = ImageTokens(hidden_size=16, soi_id=30, image_id=31, dtype=torch.float64).attach(model)
    ids = torch.tensor([[1, 5, 30, 31]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 32
    assert torch.equal(logits[..., 30:], torch.full_like(logits[..., 30:], -100.0))
    with pytest.raises(ValueError, match="already attached"):
        tokens.attach(model)
    tokens.remove()
