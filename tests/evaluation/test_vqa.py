"""VQA accuracy against hand-worked cases of the official VQA evaluation rules."""

from __future__ import annotations

import pytest

from mmlayers.evaluation import normalize_vqa_answer, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),  # number words
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("The cat", "cat"),  # articles
        ("a man and an apple", "man and apple"),
        ("yes.", "yes"),  # a period not followed by a digit is deleted
        ("1.5", "1.5"),  # ... one followed by a digit stays
        ("dont", "don't"),  # contractions restored
        ("isnt", "isn't"),
        ("Im", "im"),  # the table's capitalised keys never match after lower-casing
        ("black-and-white", "black and white"),  # no space next to "-": becomes a space
        ("left - right", "left right"),  # touches a space: deleted
        ("2,000", "2000"),  # a comma between digits: every mark deleted
        ("red,blue", "red blue"),
        ("what?!", "what"),
        ("", ""),
        ("." * 40, "." * 8),  # re.UNICODE passed as count: at most 32 periods removed
    ],
)
def test_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_leave_one_out_agreement():
    humans = ["yes"] * 3 + ["no"] * 7
    # 3 agreeing humans: the 3 subsets without one of them have 2 matches (2/3), the
    # 7 others keep all 3 (1.0): (3·2/3 + 7)/10.
    assert vqa_accuracy("yes", humans) == pytest.approx(0.9)
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("maybe", humans) == 0.0


def test_normalises_only_when_humans_disagree():
    # Humans all agree: raw strings are compared, so case and articles matter.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("the dog", ["dog"] * 10) == 0.0
    # One dissenting human switches normalisation on for everyone.
    assert vqa_accuracy("the Dog", ["dog"] * 9 + ["cat"]) == pytest.approx(1.0)
    assert vqa_accuracy("Two", ["2"] * 9 + ["3"]) == pytest.approx(1.0)
    # Surrounding whitespace, tabs and newlines are always cleaned.
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0


def test_empty_answer():
    assert vqa_accuracy("", ["yes"] * 10) == 0.0
    # An empty prediction matches empty human answers (they do occur in VizWiz).
    assert vqa_accuracy("", [""] * 3 + ["yes"] * 7) == pytest.approx(0.9)


def test_vizwiz_style_normalises_the_prediction_only():
    humans = ["unanswerable"] * 10
    assert vqa_accuracy("Unanswerable.", humans, style="vizwiz") == 1.0
    assert vqa_accuracy("Unanswerable.", humans) == 0.0  # VQAv2: all agree, raw compare
    # Human answers are not normalised in the VizWiz evaluation.
    assert vqa_accuracy("2", ["two"] * 10, style="vizwiz") == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(TypeError, match="must be str"):
        vqa_accuracy(3, ["3"])
    with pytest.raises(ValueError, match="style"):
        vqa_accuracy("yes", ["yes"], style="gqa")
