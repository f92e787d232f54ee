"""Word-level tokenizer: round trip, fixed ids, save/load; image tokens for any HF tokenizer."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmlayers.data import ShapesCorpus, ensure_image_tokens, image_token_ids, word_level_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return ShapesCorpus(seed=0, length=60)


@pytest.fixture(scope="module")
def tok(corpus):
    return word_level_tokenizer(corpus.vocabulary())


def test_special_ids(tok):
    assert tok.convert_ids_to_tokens(list(range(6))) == [
        "<pad>", "<s>", "</s>", "<unk>", "<soi>", "<image>"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert image_token_ids(tok) == (4, 5)
    assert tok.convert_ids_to_tokens(6) == ","  # words follow in sorted order
    assert tok("a red", add_special_tokens=True).input_ids == [1, *tok.convert_tokens_to_ids(
        ["a", "red"])]


def test_corpus_texts_round_trip(tok, corpus):
    texts = [t for doc in corpus for t in doc.texts]
    assert len(texts) > 100
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    mixed = "A Red circle on the left.<soi><image><image> now the same circle, but small."
    ids = tok(mixed, add_special_tokens=False).input_ids
    assert ids.count(4) == 1 and ids.count(5) == 2
    assert tok.decode(ids, skip_special_tokens=True) == (
        "a red circle on the left. now the same circle, but small.")
    assert tok("a pink circle", add_special_tokens=False).input_ids[1] == tok.unk_token_id


def test_save_and_load_from_local_dir(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    text = "now a square of the same colour.<soi><image>"
    want = tok(text).input_ids
    for loaded in (PreTrainedTokenizerFast.from_pretrained(tmp_path),
                   AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded(text).input_ids == want
        assert loaded.get_vocab() == tok.get_vocab()
        assert (loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.unk_token) == (
            "<pad>", "<s>", "</s>", "<unk>")
        assert image_token_ids(loaded) == (4, 5)
        assert loaded.decode(want, skip_special_tokens=True) == "now a square of the same colour."


def _bpe_dir(tmp_path):
    """A tiny BPE tokenizer trained offline, saved like a downloaded Llama-style one."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(["a red circle on the left", "now the same in blue"] * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(tmp_path / "bpe")
    return tmp_path / "bpe"


def test_ensure_image_tokens_on_a_local_tokenizer(tmp_path):
    tok = AutoTokenizer.from_pretrained(_bpe_dir(tmp_path))
    n = len(tok)
    with pytest.raises(ValueError, match=r"no \['<soi>', '<image>'\].*ensure_image_tokens"):
        image_token_ids(tok)
    assert ensure_image_tokens(tok) == (n, n + 1) and len(tok) == n + 2
    assert ensure_image_tokens(tok) == (n, n + 1) and len(tok) == n + 2  # idempotent
    ids = tok("red<soi><image><image>blue", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["red", "<soi>", "<image>", "<image>", "blue"]
    assert ids[1:4] == [n, n + 1, n + 1]
    assert tok.decode(ids, skip_special_tokens=True) == "red blue"
    tok.save_pretrained(tmp_path / "with_images")
    again = AutoTokenizer.from_pretrained(tmp_path / "with_images")
    assert ensure_image_tokens(again) == (n, n + 1) and len(again) == n + 2
    assert again("red<soi><image><image>blue", add_special_tokens=False).input_ids == ids


def test_errors(tok):
    with pytest.raises(TypeError, match="single str"):
        word_level_tokenizer("a red circle")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        word_level_tokenizer(["a", 3])
    with pytest.raises(ValueError, match="must differ"):
        ensure_image_tokens(tok, soi_token="<x>", image_token="<x>")
    with pytest.raises(ValueError, match="non-empty str"):
        ensure_image_tokens(tok, soi_token="")
    with pytest.raises(TypeError, match="transformers tokenizer"):
        ensure_image_tokens(object())
