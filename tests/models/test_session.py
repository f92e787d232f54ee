"""InterleavedSession against a loop that re-encodes the whole document for every token."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mmlayers.adapters.context import image_contexts
from mmlayers.adapters.diffusion_sampling import ImageGenerator
from mmlayers.data import image_to_tensor, word_level_tokenizer
from mmlayers.models import (
    InterleavedSession,
    MMInterleaved,
    MMInterleavedConfig,
    SamplingConfig,
    beam_search,
    choose_token,
)

K = 4
WORDS = "a red green blue circle square triangle now the same in on left right ."


def session_config(vocab_size: int) -> MMInterleavedConfig:
    cfg = MMInterleavedConfig.tiny(vocab_size=vocab_size)
    cfg.llm.config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    cfg.llm.sync_every = 1  # both layers synchronized
    cfg.vision.num_tokens = K
    cfg.vision.resampler_depth = 1
    cfg.decoder.unet.update(block_out_channels=[16, 32, 32], cross_attention_dim=32,
                            attention_head_dim=4)
    cfg.decoder.context_hidden, cfg.decoder.context_queries = 32, 6
    return cfg


def build(dtype=torch.float64, seed=0):
    tok = word_level_tokenizer([WORDS])
    torch.manual_seed(seed)
    model = MMInterleaved.from_config(session_config(len(tok)), tokenizer=tok).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every adapter that starts as the identity is made to matter
        for name, p in model.named_parameters():
            if name.endswith("gate") or ".conv." in name and name.startswith("unet_sync"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, mod in model.unet.named_modules():
            if name.endswith("attn2"):
                w = mod.to_out[0].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)
        model.image_tokens.head.bias.zero_()
    return model.to(dtype), tok


@pytest.fixture(scope="module")
def fp64():
    return build()


def image(seed: int) -> torch.Tensor:
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed))


class ReencodeOracle:
    """The plain loop: every token and every image re-runs the vision side on every image
    and the LLM on the whole document; the image generator is rebuilt per image."""

    def __init__(self, model, tok):
        self.model, self.tok, self.t = model, tok, model.config.tokens
        self.ids, self.images = [self.t.bos_id], []

    def add_text(self, text):
        self.ids += self.tok(text, add_special_tokens=False)["input_ids"]

    def add_image(self, img):
        self.ids += ([] if self.ids[-1] == self.t.soi_id else [self.t.soi_id]) + [self.t.image_id] * K
        self.images.append(img)

    def forward(self, ids=None):
        m = self.model
        ids = torch.tensor([self.ids if ids is None else ids])
        vis = m.encode_images(torch.stack(self.images)) if self.images else None
        n = len(self.images)
        hidden, logits = m._run_llm(ids, None, vis, torch.zeros(n, dtype=torch.long),
                                    torch.tensor([n]))
        return ids, hidden, logits, vis

    def masked(self, logits, allow=True):
        logits = logits.float().clone()
        never = [self.t.image_id, self.t.bos_id, self.t.pad_id, self.tok.unk_token_id]
        logits[never + ([] if allow else [self.t.soi_id])] = -math.inf  # pad, unk: invisible
        return logits

    def generate_text(self, max_new, sampling=None, generator=None):
        sampling, new = sampling or SamplingConfig(), []
        for _ in range(max_new):
            logits = self.forward()[2][0, -1]
            token = choose_token(self.masked(logits), sampling, generator=generator)
            self.ids.append(token)
            new.append(token)
            if token in (self.t.eos_id, self.t.soi_id):
                break
        return new

    def generate_beam(self, max_new, num_beams):
        seqs = [[]]

        def step(tokens, parents):
            nonlocal seqs
            seqs = [seqs[p] + [t] for p, t in zip(parents.tolist(), tokens.tolist(), strict=True)]
            return torch.stack([self.masked(self.forward(self.ids + s)[2][0, -1]).log_softmax(-1)
                                for s in seqs])

        first = self.masked(self.forward()[2][0, -1]).log_softmax(-1)
        out = beam_search(step, first, num_beams=num_beams, max_new_tokens=max_new,
                          stop_ids={self.t.eos_id, self.t.soi_id})
        self.ids += out
        return out

    def generate_image(self, steps, generator):
        m, t = self.model, self.t
        if self.ids[-1] != t.soi_id:
            self.ids.append(t.soi_id)
        ids, hidden, _, vis = self.forward()
        ctx = image_contexts(hidden, ids, soi_id=t.soi_id, bos_id=t.bos_id)
        ehs = m.context_encoder(ctx.hidden_states[-1:], ctx.padding_mask[-1:],
                                drop=torch.zeros(1, dtype=torch.bool))
        pyramid = None if vis is None else vis.unet_features[0][-1:]
        gen = ImageGenerator(unet=m.unet, scheduler=m.inference_scheduler, vae=m.vae,
                             synchronizer=m.unet_sync)
        out = gen(ehs, negative_hidden_states=m.context_encoder.negative(1), pyramid=pyramid,
                  has_image=None if vis is None else torch.ones(1, dtype=torch.bool),
                  num_inference_steps=steps, guidance_scale=m.config.decoder.guidance_scale,
                  generator=generator)[0]
        u8 = (out.clamp(0, 1) * 255).round().to(torch.uint8)
        self.add_image(u8.float().div_(255.0))
        return u8


def u8(pil) -> torch.Tensor:
    return (image_to_tensor(pil) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("start_with_image", [True, False])
def test_session_equals_reencode_oracle(fp64, start_with_image):
    model, tok = fp64
    session, oracle = InterleavedSession(model), ReencodeOracle(model, tok)
    prompt = ([image(0)] if start_with_image else []) + ["a red circle on the left ."]
    for doc in (session, oracle):
        for item in prompt:
            (doc.add_text if isinstance(item, str) else doc.add_image)(item)
    sample = dict(do_sample=True, temperature=0.9, top_k=8, top_p=0.95)
    for turn in range(3):
        got = session.generate_text(5, generator=torch.Generator().manual_seed(turn), **sample)
        want = oracle.generate_text(5, SamplingConfig(**sample), torch.Generator().manual_seed(turn))
        assert got.token_ids == want
        got_img = session.generate_image(num_inference_steps=2,
                                         generator=torch.Generator().manual_seed(10 + turn))
        want_img = oracle.generate_image(2, torch.Generator().manual_seed(10 + turn))
        assert torch.equal(u8(got_img), want_img)
        assert session.ids == oracle.ids
    greedy = session.generate_text(6)
    assert greedy.token_ids == oracle.generate_text(6)
    assert session.ids == oracle.ids and session.num_images == len(oracle.images)
    # each image was encoded once; each token ran through the LLM once
    assert session.stats["vision_calls"] == session.num_images
    pending = 1 if greedy.token_ids else 0
    assert session.stats["llm_tokens"] == len(session.ids) - pending


def test_beam_search_equals_oracle(fp64):
    model, tok = fp64
    session, oracle = InterleavedSession(model), ReencodeOracle(model, tok)
    for doc in (session, oracle):
        doc.add_image(image(1))
        doc.add_text("a blue square")
    got = session.generate_text(4, num_beams=3)
    assert got.token_ids == oracle.generate_beam(4, 3)
    assert session.generate_text(3).token_ids == oracle.generate_text(3)  # cache still right


def markov_model(seed=1):
    """A model whose beams diverge: input embeddings ×30 and an output head that maps each
    word to a fixed successor (plus noise), so the text is not one repeated word and the
    beams are reordered at most steps; attention and the synchronizers still shape it."""
    model, tok = build(seed=seed)
    t = model.config.tokens
    special = {t.bos_id, t.eos_id, t.soi_id, t.image_id, *tok.all_special_ids}
    words = [i for i in range(len(tok)) if i not in special]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.llm.get_input_embeddings().weight
        head = model.llm.get_output_embeddings().weight
        emb.mul_(30.0)
        successor = torch.randperm(len(words), generator=g)
        new = torch.randn(head.shape, generator=g, dtype=head.dtype) * 0.1
        for k, j in enumerate(words):
            new[words[successor[k]]] += 0.1 * emb[j] / emb[j].norm()
        new[[t.eos_id, t.soi_id]] = 0
        head.copy_(new)
    return model, tok


def test_beam_search_over_many_tokens_with_reordered_beams(monkeypatch):
    """14 tokens of 3 beams whose order changes: every step's log-probabilities of the
    cached session (which reorders its KV cache) equal those of the oracle, which
    re-encodes every hypothesis from scratch; so do the chosen tokens."""
    import mmlayers.models.session as session_module

    model, tok = markov_model()
    session, oracle = InterleavedSession(model), ReencodeOracle(model, tok)
    for doc in (session, oracle):
        doc.add_image(image(1))
        doc.add_text("a blue square")
    real = beam_search

    def spy(log):
        def search(step, first, **kw):
            def logged(tokens, parents):
                out = step(tokens, parents)
                log.append((parents.tolist(), tokens.tolist(), out))
                return out
            return real(logged, first, **kw)
        return search

    want_log, got_log = [], []
    monkeypatch.setitem(globals(), "beam_search", spy(want_log))  # the oracle's call
    want = oracle.generate_beam(14, 3)
    monkeypatch.setattr(session_module, "beam_search", spy(got_log))
    got = session.generate_text(14, num_beams=3).token_ids
    monkeypatch.undo()
    reordered = [p for p, _, _ in want_log if p != list(range(len(p)))]
    assert len(want) == 14 and len(set(want)) >= 5
    assert len(reordered) >= 5 and any(len(set(p)) == len(p) for p in reordered[1:])
    assert len(got_log) == len(want_log) == 13
    for (gp, gt, g), (wp, wt, w) in zip(got_log, want_log, strict=True):
        assert (gp, gt) == (wp, wt)
        finite = w.isfinite()
        assert torch.equal(finite, g.isfinite())
        torch.testing.assert_close(g[finite], w[finite], rtol=1e-6, atol=1e-6)  # fp32 log-probs
    assert got == want
    assert session.generate_text(4).token_ids == oracle.generate_text(4)  # cache still right



def test_float32_session_decodes_like_the_oracle():
    model, tok = build(torch.float32, seed=3)
    session, oracle = InterleavedSession(model), ReencodeOracle(model, tok)
    for doc in (session, oracle):
        doc.add_text("a green triangle")
        doc.add_image(image(2))
    assert session.generate_text(8).token_ids == oracle.generate_text(8)


def test_stream_yields_what_run_returns(fp64):
    model, _ = fp64
    runs = []
    for streaming in (False, True):
        kw = dict(max_new_tokens=4, image_kwargs={
            "num_inference_steps": 2, "generator": torch.Generator().manual_seed(0)})
        session = InterleavedSession(model)
        session.add_text("a red circle")
        with torch.no_grad():
            model.image_tokens.head.bias[0] = 0.3   # this model then writes text, image, text
            try:
                out = list(session.stream(3, **kw)) if streaming else session.run(3, **kw)
            finally:
                model.image_tokens.head.bias[0] = 0.0
        runs.append((out, list(session.ids)))
    (plain, ids_a), (streamed, ids_b) = runs
    assert ids_a == ids_b
    merged = []  # consecutive text pieces joined: one text item per turn
    for is_text, group in itertools.groupby(streamed, key=lambda x: isinstance(x, str)):
        items = list(group)
        merged += ["".join(items)] if is_text else items
    assert len(merged) == len(plain)
    for a, b in zip(plain, merged, strict=True):
        assert a == b if isinstance(a, str) else torch.equal(u8(a), u8(b))
    assert [isinstance(x, str) for x in plain][:2] == [True, False]   # text, then an image


def test_soi_switches_to_image_mode(fp64):
    model, _ = fp64
    session = InterleavedSession(model)
    session.add_text("a red circle")
    with torch.no_grad():
        model.image_tokens.head.bias[0] = 1e4   # <soi> now wins
        try:
            result = session.generate_text(5)
        finally:
            model.image_tokens.head.bias[0] = 0.0
    assert result.image_opened and not result.finished
    assert result.token_ids == [model.config.tokens.soi_id] and result.text == ""
    assert session.image_open
    with pytest.raises(ValueError, match="an image is open"):
        session.add_text("more")
    with pytest.raises(ValueError, match="an image is open"):
        session.generate_text(3)
    session.add_image(image(4))   # the user answers the open <soi> with an image
    assert not session.image_open and session.ids.count(model.config.tokens.soi_id) == 1
    assert session.ids[-K:] == [model.config.tokens.image_id] * K


def test_vision_encoder_runs_once_per_image(fp64):
    model, _ = fp64
    calls = []
    hook = model.visual.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        session = InterleavedSession(model)
        session.add_image(image(5))
        session.add_text("a red circle")
        for turn in range(2):
            session.generate_text(3)
            session.generate_image(num_inference_steps=1,
                                   generator=torch.Generator().manual_seed(turn))
        session.generate_text(3)
    finally:
        hook.remove()
    assert calls == [1, 1, 1]  # one call per image, one image per call


def test_bad_input_changes_nothing(fp64, tmp_path):
    model, _ = fp64
    session = InterleavedSession(model, max_length=4 + 2 * (K + 1))
    for call, match in [(lambda: session.generate_text(3), "document is empty"),
                        (lambda: session.generate_image(), "document is empty")]:
        with pytest.raises(ValueError, match=match):
            call()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        session.add_image(bad)
    with pytest.raises(ValueError, match="cannot read image"):
        session.add_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        session.add_image(image(0) * 2)
    with pytest.raises(TypeError, match="must be a str"):
        session.add_text(3)
    assert session.ids == [model.config.tokens.bos_id] and session.num_images == 0
    session.add_text("a red circle")            # 3 tokens + <s>
    session.add_image(image(0))                 # K + 1
    before = list(session.ids)
    with pytest.raises(ValueError, match="max_length"):
        session.add_text("a red circle on the left")
    assert session.ids == before
    result = session.generate_text(50)          # stops at the context limit
    assert len(session.ids) <= session.max_length and len(result.token_ids) <= K + 1
    with pytest.raises(ValueError, match="max_images|max_length"):
        session.generate_image()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        InterleavedSession(model, max_length=10**6)


def test_no_decoder_and_too_many_images(fp64):
    model, _ = fp64
    unet = model.unet
    model.unet = None
    try:
        session = InterleavedSession(model)
        session.add_text("a red circle")
        with pytest.raises(ValueError, match="no image decoder"):
            session.generate_image()
        with torch.no_grad():
            model.image_tokens.head.bias[0] = 1e4
            try:   # without a decoder the model is never offered <soi>
                assert not session.generate_text(2).image_opened
            finally:
                model.image_tokens.head.bias[0] = 0.0
    finally:
        model.unet = unet
    session = InterleavedSession(model)
    limit = session._sync0.max_images - 1
    session._sync0.max_images = 3
    try:
        session.add_image(image(0))
        session.add_image(image(1))
        with pytest.raises(ValueError, match="at most 2"):
            session.add_image(image(2))
        assert session.num_images == 2
    finally:
        session._sync0.max_images = limit + 1


def test_choose_token_filters():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -math.inf])
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([choose_token(logits, SamplingConfig(do_sample=True, top_p=0.8),
                                       generator=g) for _ in range(2000)])
    p = logits.softmax(-1)
    assert set(draws.tolist()) == {0, 1}   # p0 = 0.64 < 0.8 ≤ p0 + p1: the nucleus is {0, 1}
    share = (draws == 0).float().mean().item()
    assert abs(share - p[0] / (p[0] + p[1])) < 0.04
    draws = {choose_token(logits, SamplingConfig(do_sample=True, top_k=3), generator=g)
             for _ in range(500)}
    assert draws == {0, 1, 2}
    for bad in (dict(temperature=0.0), dict(top_k=0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_beam_search_finds_the_best_sequence_exhaustively():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(5, 5, generator=g).mul(2).log_softmax(-1)   # Markov chain over 5 tokens
    stop, steps = {0}, 3

    def step(tokens, parents):
        return table[tokens]

    def score(seq):
        prev, total = 4, 0.0
        for t in seq:
            total, prev = total + table[prev, t].item(), t
        return total / len(seq)

    finished = [seq for n in range(1, steps + 1) for seq in itertools.product(range(5), repeat=n)
                if (seq[-1] in stop or n == steps) and not stop & set(seq[:-1])]
    best = max(finished, key=score)
    # with as many beams as sequences, beam search is exhaustive
    assert beam_search(step, table[4], num_beams=125, max_new_tokens=steps, stop_ids=stop) \
        == list(best)


def test_min_new_tokens_holds_back_the_stop_tokens(fp64):
    model, _ = fp64
    t = model.config.tokens
    session = InterleavedSession(model)
    session.add_text("a red circle")
    with torch.no_grad():
        model.image_tokens.head.bias[0] = 1e4   # <soi> would win at once
        try:
            got = session.generate_text(6, min_new_tokens=3)
        finally:
            model.image_tokens.head.bias[0] = 0.0
    assert len(got.token_ids) == 4 and got.token_ids[-1] == t.soi_id and got.image_opened
    assert not {t.soi_id, t.eos_id} & set(got.token_ids[:3])


def test_padding_and_unknown_tokens_are_never_generated(fp64):
    """A turn of ``<pad>`` / ``<unk>`` would decode to nothing (an invisible empty turn):
    even when they are the most likely tokens, text generation writes visible words."""
    model, tok = fp64
    quiet = [model.config.tokens.pad_id, tok.unk_token_id]
    boost = torch.zeros(len(tok), dtype=torch.float64)
    boost[quiet] = 1e4
    hook = model.llm.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: out + boost[: out.shape[-1]])
    try:
        session = InterleavedSession(model)
        session.add_text("a red circle")
        got = session.generate_text(3, allow_image=False)
        beam = InterleavedSession(model)
        beam.add_text("a red circle")
        got_beam = beam.generate_text(3, allow_image=False, num_beams=2)
    finally:
        hook.remove()
    for result in (got, got_beam):
        assert not set(quiet) & set(result.token_ids), result
        assert result.text.strip()


def test_stopping_a_stream_early_keeps_the_document_consistent(fp64):
    model, tok = fp64
    session, oracle = InterleavedSession(model), ReencodeOracle(model, tok)
    for doc in (session, oracle):
        doc.add_text("a red circle")
    stream = session.stream(2, max_new_tokens=6, allow_image=False)
    first = next(stream)
    stream.close()                               # the reader stops after one piece
    assert session.items[-1] == first and len(session.ids) == len(oracle.ids) + 1
    oracle.generate_text(1)
    assert session.ids == oracle.ids
    assert session.generate_text(3).token_ids == oracle.generate_text(3)   # cache still right


def test_scheduler_by_name_or_instance_and_one_generator_each(fp64):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    model, _ = fp64
    session = InterleavedSession(model)
    session.add_text("a red circle")
    kw = dict(num_inference_steps=2, generator=None)
    a = session.generate_image(scheduler="DPMSolverMultistepScheduler",
                               **{**kw, "generator": torch.Generator().manual_seed(0)})
    gen = session._generators["DPMSolverMultistepScheduler"]
    assert isinstance(gen.scheduler, DPMSolverMultistepScheduler)
    session.add_text("again")
    session.generate_image(scheduler="DPMSolverMultistepScheduler", **kw)
    assert session._generators["DPMSolverMultistepScheduler"] is gen   # built once
    own = DDIMScheduler.from_config(model.inference_scheduler.config)
    session.add_text("and")
    session.generate_image(scheduler=own, **kw)
    assert len(session._generators) == 2 and a.size == (32, 32)
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        session.generate_image(scheduler="NoSuchScheduler")
    assert session.num_images == 3 and not session.image_open   # the refusal changed nothing


def test_repetition_penalty_matches_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    from mmlayers.models.decoding import OFFICIAL_SAMPLING, penalize_repetition

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, generator=g, dtype=torch.float64) * 3
    logits[5] = -math.inf
    prev = [3, 3, 7, 5, 0]
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prev]), logits[None].clone())[0]
    got = penalize_repetition(logits, prev, 1.3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # greedy choice changes once the favourite was already generated
    top = int(logits.argmax())
    cfg = SamplingConfig(repetition_penalty=1e6)
    assert choose_token(logits, cfg) == top and choose_token(logits, cfg, previous=[top]) != top
    assert (OFFICIAL_SAMPLING.do_sample, OFFICIAL_SAMPLING.top_p,
            OFFICIAL_SAMPLING.repetition_penalty) == (True, 0.9, 1.3)
    with pytest.raises(ValueError, match="repetition_penalty must be a number > 0, got 0"):
        SamplingConfig(repetition_penalty=0)


def test_session_repetition_penalty_equals_oracle_with_transformers_processor(fp64):
    """Greedy decoding with the penalty on this turn's tokens (the official generate passes
    only embeddings, so the prompt is not penalised) against the re-encoding loop that
    applies transformers' processor."""
    from transformers import RepetitionPenaltyLogitsProcessor

    model, tok = fp64
    session, oracle = InterleavedSession(model), ReencodeOracle(model, tok)
    for doc in (session, oracle):
        doc.add_text("a red red red circle")
    proc = RepetitionPenaltyLogitsProcessor(3.0)
    new = []
    for _ in range(8):  # min_new_tokens = 8: no stop token
        logits = oracle.masked(oracle.forward()[2][0, -1])
        logits[[oracle.t.eos_id, oracle.t.soi_id]] = -math.inf
        if new:
            logits = proc(torch.tensor([new]), logits[None].clone())[0]
        token = int(logits.argmax())
        oracle.ids.append(token)
        new.append(token)
        if token in (oracle.t.eos_id, oracle.t.soi_id):
            break
    got = session.generate_text(8, min_new_tokens=8, repetition_penalty=3.0)
    assert got.token_ids == new
    plain = InterleavedSession(model)
    plain.add_text("a red red red circle")
    assert plain.generate_text(8, min_new_tokens=8).token_ids != new  # the penalty changes this output
    with pytest.raises(ValueError, match="beam search has no repetition penalty"):
        session.generate_text(3, num_beams=2, repetition_penalty=1.3)
