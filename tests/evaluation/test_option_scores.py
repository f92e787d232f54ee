"""option_log_likelihoods on a tiny random MMInterleaved: against greedy decoding and
against log-probabilities read off one sequence at a time."""

from __future__ import annotations

import pytest
import torch

from mmlayers.data import word_level_tokenizer
from mmlayers.evaluation.option_scores import option_log_likelihoods
from mmlayers.models import InterleavedSession, MMInterleaved, MMInterleavedConfig

WORDS = "a red green blue circle square on the left right . caption : question ? answer"


@pytest.fixture(scope="module")
def model():
    tok = word_level_tokenizer([WORDS])
    cfg = MMInterleavedConfig.tiny(vocab_size=len(tok))
    cfg.llm.config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    cfg.vision.num_tokens, cfg.vision.resampler_depth = 4, 1
    torch.manual_seed(0)
    return MMInterleaved.from_config(cfg, tokenizer=tok).eval()


def _prompt():
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    return [image, "caption : a red circle . question : colour ? answer :"]


def test_greedy_token_scores_highest_among_single_words(model):
    words = [w for w in WORDS.split() if w not in ".:?"]
    scores = option_log_likelihoods(model, _prompt(), words, batch_size=5)
    session = InterleavedSession(model)
    for item in _prompt():
        session.add_text(item) if isinstance(item, str) else session.add_image(item)
    greedy = session.generate_text(max_new_tokens=1, allow_image=False).text.strip()
    assert greedy in words  # the tiny vocabulary has nothing else but punctuation
    assert words[int(scores.argmax())] == greedy


def test_equals_per_token_log_probs_of_single_sequences(model):
    from mmlayers.data import Document, InterleavedCollator

    options = ["red", "blue square", "a green circle on the left"]
    got = option_log_likelihoods(model, _prompt(), options, batch_size=2)
    collate = InterleavedCollator(tokenizer=model.tokenizer, max_length=256, pack=False,
                                  num_image_tokens=model.config.vision.num_tokens)
    n_ctx = len(collate([Document(_prompt())]).input_ids[0]) - 1
    for option, score in zip(options, got.tolist(), strict=True):
        batch = collate([Document([_prompt()[0], f"{_prompt()[1]} {option}"])])
        ids = batch.input_ids[0]
        with torch.no_grad():
            logp = model(batch).logits[0].float().log_softmax(-1)
        n_opt = len(option.split())
        want = sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, n_ctx + n_opt))
        assert score == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert got[2] < got[0]  # six tokens cost more than one in a random model


def test_bad_input(model):
    with pytest.raises(ValueError, match="last item must be text"):
        option_log_likelihoods(model, [_prompt()[0]], ["red"])
    with pytest.raises(ValueError, match="non-empty strings"):
        option_log_likelihoods(model, _prompt(), ["red", " "])
