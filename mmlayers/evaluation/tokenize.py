"""A pure-Python stand-in for the COCO caption evaluation's PTB tokenizer.

The COCO caption evaluation (``pycocoevalcap.tokenizer.PTBTokenizer``) runs the Stanford
CoreNLP 3.4.1 ``PTBTokenizer`` in Java with ``-preserveLines -lowerCase`` and then drops
the tokens ``'' ' `` ` . ? ! , : - -- ... ;`` (and the upper-case bracket names
``-LRB-`` …, which never occur after lower-casing, so the lower-case ``-lrb-`` tokens
survive). [`ptb_tokenize`][mmlayers.evaluation.tokenize.ptb_tokenize] reproduces that pipeline for the text captions are made of:
lower-casing, splitting off punctuation, quotes, brackets and ``$``, splitting
contractions (``don't`` → ``do n't``, ``can't`` → ``ca n't``), keeping hyphenated words,
numbers such as ``1,000`` and ``3:30``, and abbreviations such as ``u.s.`` or ``mr.``
whole. It is checked token for token against the Java tokenizer in the tests; it is not
a full PTB lexer (rare constructions such as URLs or emoticons may tokenize differently).
"""

from __future__ import annotations

import re

__all__ = ["PTB_PUNCTUATION", "ptb_tokenize"]

#: Tokens the COCO caption evaluation removes after tokenizing (as the Java tokenizer
#: writes them; the bracket names are upper case there and so never match).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc inc co corp ltd mt ft ave blvd jan feb mar apr jun "
    "jul aug sep sept oct nov dec no".split()
)
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "gimme": ("gim", "me"), "lemme": ("lem", "me"),
                "y'all": ("y'", "all")}
_N_INFIX = re.compile(r"^(.+)('n')(.+)$")  # rock'n'roll -> rock 'n' roll
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'m|'re|'ll|'d|'ve)$")
_LETTER_ABBREV = re.compile(r"^(?:[a-z]\.)+[a-z]?\.?$")
_LEADING = re.compile(r"^(\.\.\.|--|[?!]+|[\"'`(\[{$#,;:-])")
_TRAILING = re.compile(r"(\.\.\.|--|[?!]+|[\"'`)\]},;:.%-])$")


def _split_chunk(chunk: str) -> list[str]:
    """Split one whitespace-free chunk into PTB tokens (lower case already)."""
    head: list[str] = []
    tail: list[str] = []
    while chunk:
        m = _LEADING.match(chunk)
        if m is None:
            break
        tok = m.group(1)
        head.append(tok)
        chunk = chunk[len(tok):]
    while chunk:
        m = _TRAILING.search(chunk)
        if m is None:
            break
        tok = m.group(1)
        if tok in (".", "..."):
            # An abbreviation keeps one period; further periods are tokens of their own.
            stem = chunk.rstrip(".")
            if stem and (_LETTER_ABBREV.match(stem + ".") or stem in _ABBREVIATIONS):
                tail[:0] = ["."] * (len(chunk) - len(stem) - 1)
                chunk = stem + "."
                break
        tail.insert(0, tok)
        chunk = chunk[: -len(tok)]
    middle: list[str] = []
    if chunk:
        for piece in re.split(r"(--)", chunk):
            if not piece:
                continue
            if piece in _SPLIT_WORDS:
                middle.extend(_SPLIT_WORDS[piece])
                continue
            m = _N_INFIX.match(piece)
            if m is not None:
                middle.extend(m.groups())
                continue
            m = _CONTRACTION.match(piece)
            if m is not None:
                stem, suffix = m.group(1), m.group(2)
                if suffix == "n't" and stem in ("ca", "wo", "ai", "sha"):
                    middle.extend([stem, suffix])
                elif suffix == "n't" or stem[-1:].isalnum():
                    middle.extend([stem, suffix])
                else:
                    middle.append(piece)
            else:
                middle.append(piece)
    return head + middle + tail


def _token_name(tok: str) -> str:
    """Java writes brackets as ``-lrb-`` … and double quotes as ``` `` ``` or ``''``."""
    return "''" if tok == '"' else _BRACKETS.get(tok, tok)


def ptb_tokenize(text: str) -> str:
    """Tokenize and lower-case one caption as the COCO caption evaluation does.

    Args:
        text: a caption. Newlines count as spaces.

    Returns:
        The tokens joined by single spaces, punctuation tokens removed.

    Raises:
        TypeError: if ``text`` is not a string.

    Examples:
        >>> ptb_tokenize("A man's dog, running (fast) down the street!")
        "a man 's dog running -lrb- fast -rrb- down the street"
        >>> ptb_tokenize('"Hello," she said... I don\\'t know the U.S. flag.')
        "hello she said i do n't know the u.s. flag"
    """
    if not isinstance(text, str):
        raise TypeError(f"ptb_tokenize expects a str, got {type(text).__name__}")
    tokens: list[str] = []
    for chunk in text.replace("\n", " ").lower().split():
        tokens.extend(_token_name(tok) for tok in _split_chunk(chunk))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)
