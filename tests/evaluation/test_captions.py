"""CIDEr-D, BLEU and the PTB tokenizer against the COCO caption evaluation (pycocoevalcap)."""

from __future__ import annotations

import math
import random
import shutil

import pytest

from mmlayers.evaluation import bleu, cider_d, ptb_tokenize

_VOCAB = (
    "a an the man woman dog cat red blue green circle square triangle on of in with near "
    "left right top bottom small large two three is are sitting standing street table"
).split()


def _fixture(num_images: int = 24, num_refs: int = 5, seed: int = 0):
    """Pre-tokenized captions: candidates share some n-grams with their references."""
    rng = random.Random(seed)
    refs, cands = {}, {}
    for i in range(num_images):
        base = [rng.choice(_VOCAB) for _ in range(rng.randint(6, 12))]
        refs[i] = []
        for _ in range(num_refs):
            words = [w if rng.random() < 0.7 else rng.choice(_VOCAB) for w in base]
            refs[i].append(" ".join(words[: rng.randint(4, len(words))]))
        cand = [w if rng.random() < 0.6 else rng.choice(_VOCAB) for w in base]
        cands[i] = " ".join(cand[: rng.randint(1, len(cand))])
    cands[0] = "dog"  # one word: no bigrams (the reference's length quirk)
    cands[1] = refs[1][0]  # an exact copy of one reference
    cands[2] = " ".join([refs[2][0].split()[0]] * 5)  # a repeated reference word: clipping
    return cands, refs


def test_cider_d_and_bleu_equal_pycocoevalcap_on_pretokenized_text():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    cands, refs = _fixture()
    res = {k: [v] for k, v in cands.items()}
    want_cider, _ = Cider().compute_score(refs, res)
    assert cider_d(cands, refs, tokenize=False) == pytest.approx(want_cider, rel=1e-9, abs=1e-12)
    want_bleu, _ = Bleu(4).compute_score(refs, res, verbose=0)
    for n in range(1, 5):
        got = bleu(cands, refs, n=n, tokenize=False)
        assert got == pytest.approx(want_bleu[n - 1], rel=1e-9, abs=1e-12), n
    assert 0.05 < want_bleu[3] < 0.9 and want_cider > 0.1  # a fixture that discriminates


def test_bleu_brevity_penalty_uses_closest_reference_length():
    from pycocoevalcap.bleu.bleu import Bleu

    refs = {1: ["a b c d e f g h", "a b c"], 2: ["x y z w v u", "x y z w"]}
    cands = {1: "a b c d", 2: "x y"}  # closest lengths 3 and 4 (tie 4 vs. 2: shorter wins)
    want, _ = Bleu(4).compute_score(refs, {k: [v] for k, v in cands.items()}, verbose=0)
    assert bleu(cands, refs, n=2, tokenize=False) == pytest.approx(want[1], rel=1e-12)


def test_hand_computed_values():
    # Two ids with disjoint vocabularies, candidate = the only reference: every n-gram
    # has df = 1, idf = log 2, so each order's cosine is 1 and the score is 10.
    refs = {1: ["a red circle on the left"], 2: ["one blue square at top"]}
    assert cider_d({1: refs[1][0], 2: refs[2][0]}, refs) == pytest.approx(10.0, rel=1e-12)
    # One id: idf = log 1 - log 1 = 0 for every n-gram, so CIDEr-D is 0.
    assert cider_d({1: "a red circle"}, {1: ["a red circle"]}) == 0.0
    # The classic clipping example: BLEU-1 of "the the the the" against "the cat" is 1/4.
    got = bleu({1: "the the the the"}, {1: ["the cat"]}, n=1, tokenize=False)
    assert got == pytest.approx((1 + 1e-15) / (4 + 1e-9), rel=1e-12)
    # Brevity penalty: 2 words against a 4-word reference, all unigrams right.
    got = bleu({1: "red circle"}, {1: ["a red circle here"]}, n=1, tokenize=False)
    assert got == pytest.approx(math.exp(1 - 4 / 2), rel=1e-8)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A Man's DOG, running!", "a man 's dog running"),
        ("I don't know; can't say: won't go.", "i do n't know ca n't say wo n't go"),
        ('She said "hello" (twice) -- and left...', "she said hello -lrb- twice -rrb- and left"),
        ("1,000 people at 3:30 p.m. in the U.S.", "1,000 people at 3:30 p.m. in the u.s."),
        ("A black-and-white cat. gonna", "a black-and-white cat gon na"),
        ("Dogs' toys [red] {blue} $5", "dogs toys -lsb- red -rsb- -lcb- blue -rcb- $ 5"),
    ],
)
def test_ptb_tokenize_cases(text, tokens):
    assert ptb_tokenize(text) == tokens


_RAW = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs' toys, a black-and-white cat: 1,000 people? Yes!",
    '"Hello," she said... It\'s 3:30 p.m. and I don\'t know.',
    "The U.S. flag & a $5 bill -- cheap (really).",
    "Isn't it [great]? {Sure} can't won't gonna",
    "I'm sure you're right; we'll see if they'd come, she's here",
    "A group of people standing around a kitchen counter.",
    "A close up of a plate of food with broccoli",
    "Mr. Smith's bike is parked near St. Mary's church.",
    "A giraffe standing next to a tree in a zoo .",
    "a woman holding an umbrella in the rain ,while walking",
    "There are 2 cats - one is black, the other's white.",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference tokenizer runs in Java")
def test_ptb_tokenize_equals_the_java_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": s}] for i, s in enumerate(_RAW)}
    want = PTBTokenizer().tokenize(gts)
    for i, s in enumerate(_RAW):
        assert ptb_tokenize(s) == want[i][0], s


def _caption_like(rng: random.Random, n: int) -> list[str]:
    subj = ["A man", "Two women", "The dog", "An elderly couple", "A cat's toy", "Some kids"]
    verb = ["is riding", "are standing near", "sits on", "isn't near", "holds", "walks past"]
    obj = ["a surfboard", "the table", "an umbrella", "the street (downtown)", "the U.S. flag",
           "a giraffe, a zebra", "a 10-year-old's cake", "Mr. Smith's 1,000 $5 bills"]
    tail = [".", " .", "", "!", "?", ", outside.", "; it's sunny.", "... ", ' "nice".', "-- wow"]
    return [f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}{rng.choice(tail)}"
            for _ in range(n)]


def _punctuation_soup(rng: random.Random, n: int) -> list[str]:
    words = ("a A man's dog The U.S. can't don't won't Mr. St. 3:30 1,000 $5 black-and-white "
             "(left) [top] \"quoted\" 'single' etc. e.g. i.e. rock'n'roll 5.5 #1 50% "
             "o'clock wasn't they're y'all dogs' ... -- - ; : ! ? , .").split()
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        s += rng.choice([".", "!", "?", " .", "..", ""])
        out.append(s.replace(" ,", ",") if rng.random() < 0.3 else s)
    return out


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference tokenizer runs in Java")
def test_ptb_tokenize_agrees_with_java_on_generated_text():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    rng = random.Random(0)
    captions, soup = _caption_like(rng, 2000), _punctuation_soup(rng, 2000)
    want = PTBTokenizer().tokenize(
        {i: [{"caption": s}] for i, s in enumerate(captions + soup)}
    )
    assert all(ptb_tokenize(s) == want[i][0] for i, s in enumerate(captions))
    # Adversarial mixes: a single letter ending a line ("... 50% A.") keeps or loses its
    # period by context in the Java lexer; measured 2 differences in 6,000 such lines.
    wrong = sum(ptb_tokenize(s) != want[len(captions) + i][0] for i, s in enumerate(soup))
    assert wrong <= 4, wrong


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference tokenizer runs in Java")
def test_tokenized_scores_equal_cocoevalcap_pipeline():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {i: [s, s.upper(), _RAW[(i + 1) % len(_RAW)]] for i, s in enumerate(_RAW)}
    cands = {i: _RAW[(i * 5) % len(_RAW)].replace("a ", "the ") for i in range(len(_RAW))}
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in cands.items()})
    assert cider_d(cands, refs) == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-9)
    want = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    assert bleu(cands, refs) == pytest.approx(want, rel=1e-9)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="same ids"):
        cider_d({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="non-empty list"):
        bleu({1: "a"}, {1: "a"})
    with pytest.raises(TypeError, match="must be a str"):
        bleu({1: 3}, {1: ["a"]})
    with pytest.raises(ValueError, match="positive int"):
        bleu({1: "a"}, {1: ["a"]}, n=0)
