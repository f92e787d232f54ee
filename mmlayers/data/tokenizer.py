"""A download-free word-level tokenizer, and image tokens for any Hugging Face tokenizer.

[`word_level_tokenizer`][mmlayers.data.tokenizer.word_level_tokenizer] builds a ``transformers.PreTrainedTokenizerFast`` from a list
of texts with the ``tokenizers`` library: lower-casing, whitespace + punctuation
pre-tokenisation, one id per word, and a decoder that re-attaches punctuation, so corpus
captions round-trip exactly (``decode(encode(t)) == t.lower()`` for single-spaced text
with no space before punctuation). ``save_pretrained`` / ``from_pretrained(local_dir)``
and ``AutoTokenizer.from_pretrained(local_dir)`` work as for any fast tokenizer.

Fixed ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<soi>`` 4, ``<image>`` 5, then
the words in sorted order.

[`ensure_image_tokens`][mmlayers.data.tokenizer.ensure_image_tokens] adds ``<soi>`` and ``<image>`` (as special tokens, never split and
skipped by ``decode(..., skip_special_tokens=True)``) to any tokenizer, e.g. a Llama
tokenizer loaded from a local directory; it is idempotent. Resizing the model's embedding
matrix to ``len(tokenizer)`` is the model's job.

transformers and tokenizers are imported when these functions are called.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mmlayers._optional import require

__all__ = ["IMAGE_TOKEN", "SOI_TOKEN", "ensure_image_tokens", "image_token_ids",
           "word_level_tokenizer"]

SOI_TOKEN = "<soi>"
IMAGE_TOKEN = "<image>"
_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def word_level_tokenizer(texts: Iterable[str], *, model_max_length: int = 2048) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is every word in ``texts``.

    Args:
        texts: texts (or single words) that define the vocabulary; words are found with the
            tokenizer's own normaliser and pre-tokeniser, so anything written the same way
            later encodes without ``<unk>``.
        model_max_length: recorded in the tokenizer config.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``bos`` ``<s>``, ``eos`` ``</s>``,
        ``pad`` ``<pad>``, ``unk`` ``<unk>`` and the special tokens ``<soi>`` and
        ``<image>``. ``add_special_tokens=True`` (the default when calling it) prepends
        ``<s>``; the collator inserts its own special tokens and encodes without them.

    Examples:
        >>> tok = word_level_tokenizer(["a red circle on the left."])
        >>> ids = tok("A red circle on the left.", add_special_tokens=False).input_ids
        >>> tok.convert_ids_to_tokens(ids)
        ['a', 'red', 'circle', 'on', 'the', 'left', '.']
        >>> tok.decode(ids), tok("red").input_ids, image_token_ids(tok)
        ('a red circle on the left.', [1, 11], (4, 5))
    """
    require("transformers", "data")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, got a single str; wrap it in "
                        "a list")
    normalizer = normalizers.Lowercase()
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                   pre_tokenizers.Punctuation()])
    specials = (*_SPECIALS, SOI_TOKEN, IMAGE_TOKEN)
    words = set()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    words.difference_update(specials)
    vocab = {t: i for i, t in enumerate((*specials, *sorted(words)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # " ." → "."
    backend.add_special_tokens(list(specials))
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def _token_id(tokenizer: Any, token: str) -> int | None:
    return tokenizer.get_vocab().get(token)


def ensure_image_tokens(tokenizer: Any, *, soi_token: str = SOI_TOKEN,
                     image_token: str = IMAGE_TOKEN) -> tuple[int, int]:
    """Add ``<soi>`` and ``<image>`` to a Hugging Face tokenizer, in place; idempotent.

    Tokens already in the vocabulary are left as they are. Call it after
    ``AutoTokenizer.from_pretrained(local_dir)``, then resize the model's embeddings to
    ``len(tokenizer)``.

    Args:
        tokenizer: a ``transformers`` tokenizer (fast or slow).
        soi_token: the begin-of-image token string.
        image_token: the image slot token string.

    Returns:
        ``(soi_id, image_id)``.

    Examples:
        >>> tok = word_level_tokenizer(["a red circle."])
        >>> ensure_image_tokens(tok), len(tok)
        ((4, 5), 10)
        >>> ensure_image_tokens(tok, soi_token="<boi>"), len(tok)
        ((10, 5), 11)
    """
    for name, t in (("soi_token", soi_token), ("image_token", image_token)):
        if not isinstance(t, str) or not t:
            raise ValueError(f"{name} must be a non-empty str, got {t!r}")
    if soi_token == image_token:
        raise ValueError(f"soi_token and image_token must differ, both are {soi_token!r}")
    if not hasattr(tokenizer, "add_tokens") or not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got "
                        f"{type(tokenizer).__name__}")
    from tokenizers import AddedToken

    missing = [t for t in (soi_token, image_token) if _token_id(tokenizer, t) is None]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
    return _token_id(tokenizer, soi_token), _token_id(tokenizer, image_token)


def image_token_ids(tokenizer: Any, *, soi_token: str = SOI_TOKEN,
                    image_token: str = IMAGE_TOKEN) -> tuple[int, int]:
    """``(soi_id, image_id)`` of a tokenizer that has them; ``ValueError`` naming what is
    missing (and pointing to [`ensure_image_tokens`][mmlayers.data.tokenizer.ensure_image_tokens]) otherwise."""
    ids = (_token_id(tokenizer, soi_token), _token_id(tokenizer, image_token))
    missing = [t for t, i in zip((soi_token, image_token), ids, strict=True) if i is None]
    if missing:
        raise ValueError(f"the tokenizer has no {missing} token(s); call "
                         f"ensure_image_tokens(tokenizer) first")
    return ids
