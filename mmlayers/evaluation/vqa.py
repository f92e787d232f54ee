"""VQA accuracy with the official VQA evaluation's answer normalisation, quirks included."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["normalize_vqa_answer", "vqa_accuracy"]

# The official tables (GT-Vision-Lab/VQA ``vqaEval.py``), as data.
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(["a", "an", "the"])
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!"]
# Apostrophe-less spellings → the contraction. Keys with capitals (``Im``, ``Ive``,
# ``Id've``, ``I'dve``) are kept as the official table has them: they can never match
# because words are lower-cased first. ``somebody'd`` maps to ``somebodyd`` there too.
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in (
        "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't "
        "couldn'tve=couldn't've couldnt've=couldn't've didnt=didn't doesnt=doesn't "
        "dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't "
        "havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd "
        "howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't "
        "itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am "
        "mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've "
        "mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock "
        "oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
        "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've "
        "shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've "
        "somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've "
        "somebodyll=somebody'll somebodys=somebody's someoned=someone'd "
        "someoned've=someone'd've someone'dve=someone'd've someonell=someone'll "
        "someones=someone's somethingd=something'd somethingd've=something'd've "
        "something'dve=something'd've somethingll=something'll thats=that's "
        "thered=there'd thered've=there'd've there'dve=there'd've therere=there're "
        "theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've "
        "theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't "
        "wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll "
        "whatre=what're whats=what's whatve=what've whens=when's whered=where'd "
        "wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've "
        "wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's "
        "wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've "
        "wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll "
        "yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd "
        "youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've"
    ).split()
)
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": the first group is a negative LOOKAHEAD
# for the text "<=digit" (a typo for a lookbehind), so it removes every "." not followed
# by a digit. It is also called with re.UNICODE in the count position, so at most 32
# periods are removed. Both quirks are kept.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_MAX_COUNT = int(re.UNICODE)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation (``processPunctuation`` + ``processDigitArticle``).

    Punctuation marks are deleted if any of them touches a space or the text has a comma
    between digits, else replaced by a space; periods not followed by a digit are
    deleted; then words are lower-cased, number words ``zero``…``ten`` (and ``none``)
    become digits, articles are dropped and apostrophe-less contractions are restored.

    Args:
        answer: one answer string.

    Returns:
        The normalised answer.

    Raises:
        TypeError: if ``answer`` is not a string.

    Examples:
        >>> normalize_vqa_answer("Two dogs.")
        '2 dogs'
        >>> normalize_vqa_answer("the cat isnt black-and-white")
        "cat isn't black and white"
    """
    if not isinstance(answer, str):
        raise TypeError(f"VQA answers must be str, got {type(answer).__name__}")
    text = answer
    delete = _COMMA_BETWEEN_DIGITS.search(answer) is not None
    for p in _PUNCT:
        if delete or p + " " in answer or " " + p in answer:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text, count=_PERIOD_MAX_COUNT)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(answer: str, human_answers: Sequence[str], *, style: str = "vqav2") -> float:
    """Accuracy of one predicted answer against the human answers (usually 10).

    For each human answer i, the accuracy against the other answers is
    ``min(#{j ≠ i : human_j == answer} / 3, 1)``; the result is the mean over i (so an
    answer given by 4 or more of 10 humans scores 1.0, by 3 scores 0.9, by 2 scores 0.6,
    by 1 scores 0.3).
    Before comparing, answers have tabs/newlines turned into spaces and are stripped.

    Normalisation ([`normalize_vqa_answer`][mmlayers.evaluation.vqa.normalize_vqa_answer]) differs by evaluation:

    - ``style="vqav2"`` (VQAv2, OK-VQA, TextVQA; ``GT-Vision-Lab/VQA``): the prediction
      and the human answers are normalised **only when the human answers are not all
      identical**; when they agree, the raw (stripped) strings are compared.
    - ``style="vizwiz"`` (the VizWiz evaluation): only the prediction is normalised,
      always; human answers are compared as given.

    Args:
        answer: the predicted answer, already extracted from the generated text.
        human_answers: the human answers for the question.
        style: ``"vqav2"`` or ``"vizwiz"``.

    Returns:
        The accuracy in [0, 1] (the official tools report 100 × the mean over questions).

    Raises:
        TypeError: if an answer is not a string.
        ValueError: if ``human_answers`` is empty or ``style`` is unknown.

    Examples:
        >>> humans = ["2"] * 2 + ["two"] + ["3"] * 7
        >>> round(vqa_accuracy("Two", humans), 4)  # normalised: 3 humans said "2"
        0.9
        >>> round(vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8), 4)
        0.6
        >>> vqa_accuracy("Yes", ["yes"] * 10)  # all agree: no normalisation
        0.0
    """
    if style not in ("vqav2", "vizwiz"):
        raise ValueError(f"vqa_accuracy: style must be 'vqav2' or 'vizwiz', got {style!r}")
    if isinstance(human_answers, str) or not human_answers:
        raise ValueError(
            f"vqa_accuracy: human_answers must be a non-empty list of str, got {human_answers!r}"
        )
    for a in (answer, *human_answers):
        if not isinstance(a, str):
            raise TypeError(f"vqa_accuracy: answers must be str, got {type(a).__name__}")
    pred = _clean_whitespace(answer)
    if style == "vizwiz":
        humans = list(human_answers)
        pred = normalize_vqa_answer(pred)
    else:
        humans = [_clean_whitespace(a) for a in human_answers]
        if len(set(humans)) > 1:
            humans = [normalize_vqa_answer(a) for a in humans]
            pred = normalize_vqa_answer(pred)
    matches = [a == pred for a in humans]
    total = sum(matches)
    accs = [min(1.0, (total - m) / 3) for m in matches]
    return sum(accs) / len(accs)
