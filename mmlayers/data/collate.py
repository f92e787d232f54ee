"""Collation: interleaved documents → packed token rows, stacked images and text labels.

Shape key: b rows · n tokens per row · m images (all rows together) · c, H, W image.

Each document becomes ``<s>`` + its items + ``</s>``: a text item is its tokens, an image
item is ``<soi>`` followed by ``k`` ``<image>`` slots (``num_image_tokens``; 64 in the
paper). Documents are packed, in order, into rows of at most ``max_length`` tokens; each
keeps its own ``<s>`` (a row may hold several segments). A document that does not fit in
the rest of a row starts the next row. A document longer than ``max_length`` is
truncated (``truncate=True``) at ``max_length`` tokens, but never inside an image: an image
that would be cut is dropped together with everything after it (the truncated document has
no ``</s>``). A document whose first image or text token cannot fit at all raises.

**Label convention** (the Hugging Face one): ``labels`` has the shape of ``input_ids`` and
``labels[t]`` is the *target* token at position t, predicted from tokens < t; causal LMs
shift internally (``logits[:, :-1]`` against ``labels[:, 1:]``). ``labels[t] = input_ids[t]``
except −100 where token t is (the official code's rules):

- padding (``attention_mask == 0``), ``<image>``, or ``<s>`` (so the jump from one packed
  document into the next is never a target; ``labels[:, 0]`` is always −100);
- ``<soi>`` right after ``<s>`` (whether a document opens with an image is not
  predictable; a ``<soi>`` after text *is* trained, as is ``</s>``);
- inside a document's prompt items (``Document.prompt_items``);
- before the first ``<soi>`` of a ``caption_first`` document (text with no earlier image in
  its segment; its ``</s>`` too if it has no image).

Per image (in row-major order) the batch also says where its ``<soi>`` and its segment's
``<s>`` are, whether it has context (anything between ``<s>`` and ``<soi>``; images with
only ``<s><soi>`` get no diffusion loss) and which image is the previous one in the same
segment (the UNet synchronizer's source; −1 for a segment's first image).

**Pre-packed rows.** The collator also takes [`PackedRow`][mmlayers.data.packing.PackedRow] objects
(token-level packing by [`RowPacker`][mmlayers.data.packing.RowPacker] / [`InterleavedStream`][mmlayers.data.packing.InterleavedStream]):
each becomes one row as it is. A row may then start with the continuation of a document cut
in the previous row (no ``<s>``); its images count as having context when any token
precedes their ``<soi>`` in the row, and ``image_document`` numbers the pieces of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from mmlayers.data.document import Document, image_to_tensor
from mmlayers.data.packing import PackedRow
from mmlayers.data.tokenizer import IMAGE_TOKEN, SOI_TOKEN, image_token_ids

__all__ = ["IGNORE_INDEX", "InterleavedBatch", "InterleavedCollator", "interleaved_labels"]

IGNORE_INDEX = -100


def interleaved_labels(input_ids: torch.Tensor, *, bos_id: int, soi_id: int, image_id: int,
                       attention_mask: torch.Tensor | None = None, pad_id: int | None = None,
                       ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Text labels for packed interleaved rows (the rules in the module docstring).

    Args:
        input_ids: (b, n) token ids.
        bos_id: id of ``<s>``.
        soi_id: id of ``<soi>``.
        image_id: id of ``<image>``.
        attention_mask: (b, n); positions where it is 0 are ignored.
        pad_id: ids equal to it are ignored too. Leave it ``None`` when padding reuses
            ``</s>`` (as many Llama setups do) and pass ``attention_mask`` instead.
        ignore: (b, n) bool, extra positions to ignore (prompts, caption-first text).

    Returns:
        (b, n) long labels, −100 where ignored; ``labels[t]`` is the target at position t.

    Examples:
        >>> import torch
        >>> S, E, SOI, IMG, x, y = 1, 2, 4, 5, 7, 8
        >>> ids = torch.tensor([[S, SOI, IMG, x, SOI, IMG, E, S, y, E]])
        >>> interleaved_labels(ids, bos_id=S, soi_id=SOI, image_id=IMG).tolist()
        [[-100, -100, -100, 7, 4, -100, 2, -100, 8, 2]]
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (b, n) tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    for name, extra in (("attention_mask", attention_mask), ("ignore", ignore)):
        if extra is not None and tuple(extra.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(extra.shape)}")
    prev = F.pad(input_ids[:, :-1], (1, 0), value=bos_id)  # token before t (<s> before t = 0)
    drop = (input_ids == image_id) | (input_ids == bos_id) | ((input_ids == soi_id) & (prev == bos_id))
    if attention_mask is not None:
        drop |= attention_mask == 0
    if pad_id is not None:
        drop |= input_ids == pad_id
    if ignore is not None:
        drop |= ignore.bool()
    drop[:, :1] = True
    return input_ids.masked_fill(drop, IGNORE_INDEX)


@dataclass
class InterleavedBatch:
    """What [`InterleavedCollator`][mmlayers.data.collate.InterleavedCollator] returns. Images are numbered row by row, in order.

    Attributes:
        input_ids: (b, n) long, right-padded.
        attention_mask: (b, n) long, 1 on tokens, 0 on padding.
        labels: (b, n) long, −100 where ignored (see the module docstring).
        images: (m, c, H, W) float in [0, 1] (shape (0, 0, 0, 0) when there is none).
        images_per_row: (b,) long.
        image_row: (m,) long, the row of each image.
        image_soi: (m,) long, position of its ``<soi>`` in its row.
        image_bos: (m,) long, position of its segment's ``<s>``; its context is
            ``input_ids[row, bos : soi + 1]``.
        image_has_context: (m,) bool, False when the context is only ``<s><soi>``.
        image_previous: (m,) long, index (into ``images``) of the previous image in the same
            segment, −1 for a segment's first image.
        image_document: (m,) long, index of the source document in the collated list.
        row_documents: per row, the indices of the documents packed in it.
        truncated: indices of the documents that were truncated.
        data_state: where a streamed batch leaves its data stream (set by
            [`InterleavedStream`][mmlayers.data.packing.InterleavedStream]; ``None`` otherwise).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor
    images_per_row: torch.Tensor
    image_row: torch.Tensor
    image_soi: torch.Tensor
    image_bos: torch.Tensor
    image_has_context: torch.Tensor
    image_previous: torch.Tensor
    image_document: torch.Tensor
    row_documents: list[list[int]] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)
    data_state: dict[str, Any] | None = None

    def to(self, device: Any) -> InterleavedBatch:
        """A copy with every tensor moved to ``device``."""
        return InterleavedBatch(**{f.name: (getattr(self, f.name).to(device)
                                            if isinstance(getattr(self, f.name), torch.Tensor)
                                            else getattr(self, f.name)) for f in fields(self)})


@dataclass
class _Encoded:
    doc: int
    ids: list[int]
    no_loss: list[bool]
    soi: list[int]  # <soi> positions inside the document
    images: list[torch.Tensor]
    opens: bool = True  # the piece starts with its document's <s>


class InterleavedCollator:
    """Documents → [`InterleavedBatch`][mmlayers.data.collate.InterleavedBatch] (packed rows, images, labels, image bookkeeping).

    Args:
        tokenizer: a ``transformers`` tokenizer with ``<s>``/``</s>`` (bos/eos) and the
            ``<soi>``/``<image>`` tokens (see [`ensure_image_tokens`][mmlayers.data.tokenizer.ensure_image_tokens]); padding
            uses its pad token, or ``</s>`` if it has none (labels use the attention mask).
        num_image_tokens: ``<image>`` slots per image (k).
        max_length: most tokens per row.
        pack: pack several documents per row (else one document per row).
        truncate: cut documents longer than ``max_length`` at an image boundary (else raise).
        pad_to_max_length: pad every row to ``max_length`` (else to the longest row).
        soi_token: the begin-of-image token string.
        image_token: the image slot token string.

    Attributes:
        bos_id: id of ``<s>``.
        eos_id: id of ``</s>``.
        pad_id: id of the padding token.
        soi_id: id of ``<soi>``.
        image_id: id of ``<image>``.

    Examples:
        >>> import torch
        >>> from mmlayers.data import Document, word_level_tokenizer
        >>> tok = word_level_tokenizer(["a red circle."])
        >>> collate = InterleavedCollator(tokenizer=tok, num_image_tokens=2, max_length=16)
        >>> batch = collate([Document([torch.zeros(3, 8, 8), "a red circle."]),
        ...                  Document(["a circle."])])
        >>> print(" ".join(tok.convert_ids_to_tokens(batch.input_ids[0])))
        <s> <soi> <image> <image> a red circle . </s> <s> a circle . </s>
        >>> batch.labels[0].tolist()
        [-100, -100, -100, -100, 7, 9, 8, 6, 2, -100, 7, 8, 6, 2]
        >>> tuple(batch.images.shape), batch.image_has_context.tolist()
        ((1, 3, 8, 8), [False])
    """

    def __init__(self, *, tokenizer: Any, num_image_tokens: int, max_length: int,
                 pack: bool = True, truncate: bool = True, pad_to_max_length: bool = False,
                 soi_token: str = SOI_TOKEN, image_token: str = IMAGE_TOKEN) -> None:
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) \
                or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int ≥ 2 (room for <s> and one token), "
                             f"got {max_length!r}")
        self.soi_id, self.image_id = image_token_ids(tokenizer, soi_token=soi_token,
                                                     image_token=image_token)
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"the tokenizer needs bos (<s>) and eos (</s>) tokens, got "
                             f"bos_token_id={self.bos_id}, eos_token_id={self.eos_id}")
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else pad
        self.tokenizer = tokenizer
        self.num_image_tokens, self.max_length = num_image_tokens, max_length
        self.pack, self.truncate, self.pad_to_max_length = pack, truncate, pad_to_max_length

    # -- one document ----------------------------------------------------------------------
    def encode(self, document: Document) -> _Encoded:
        """Token ids of one document, unpacked and untruncated (what packers consume).

        Returns:
            An object with ``ids`` (``<s>`` … ``</s>``), ``no_loss`` (per token, True on prompt
            and caption-first text), ``soi`` (``<soi>`` positions) and ``images`` (tensors).
        """
        return self._encode(document, 0)

    def _encode(self, doc: Document, index: int) -> _Encoded:
        if not isinstance(doc, Document):
            raise TypeError(f"documents[{index}] must be a Document, got {type(doc).__name__}")
        k, reserved = self.num_image_tokens, {self.soi_id, self.image_id, self.bos_id, self.eos_id}
        enc = _Encoded(index, [self.bos_id], [False], [], [])
        for j, item in enumerate(doc.items):
            prompt = j < doc.prompt_items
            if isinstance(item, str):
                toks = list(self.tokenizer(item, add_special_tokens=False)["input_ids"])
                if reserved.intersection(toks):
                    raise ValueError(f"documents[{index}].items[{j}] is text that contains a "
                                     f"special token (<s>, </s>, <soi> or <image>): {item!r}; "
                                     f"put images in the item list instead")
                enc.ids += toks
                enc.no_loss += [prompt] * len(toks)
            else:
                enc.soi.append(len(enc.ids))
                enc.ids += [self.soi_id] + [self.image_id] * k
                enc.no_loss += [prompt] * (1 + k)
                enc.images.append(image_to_tensor(item))
        enc.ids.append(self.eos_id)
        enc.no_loss.append(False)
        if doc.caption_first:
            first = enc.soi[0] if enc.soi else len(enc.ids)
            enc.no_loss[:first] = [True] * first
        return enc

    def _fit(self, enc: _Encoded) -> tuple[_Encoded, bool]:
        """Truncate to ``max_length`` at an image boundary; (encoded, was_truncated)."""
        limit, k = self.max_length, self.num_image_tokens
        if len(enc.ids) <= limit:
            return enc, False
        if not self.truncate:
            raise ValueError(f"documents[{enc.doc}] has {len(enc.ids)} tokens, more than "
                             f"max_length={limit}; shorten it or pass truncate=True")
        cut, kept = limit, 0
        for s in enc.soi:
            if s + 1 + k > limit:
                cut = min(cut, s)
                break
            kept += 1
        if cut <= 1:
            raise ValueError(f"documents[{enc.doc}] cannot fit in max_length={limit}: it opens "
                             f"with an image, which needs {2 + k} tokens (<s> <soi> "
                             f"<image>×{k}); raise max_length or lower num_image_tokens")
        return _Encoded(enc.doc, enc.ids[:cut], enc.no_loss[:cut], enc.soi[:kept],
                        enc.images[:kept]), True

    # -- the batch -------------------------------------------------------------------------
    def __call__(self, documents: Sequence[Document] | Sequence[PackedRow]) -> InterleavedBatch:
        """Collate documents (b rows ≤ number of documents), or pre-packed rows (one row
        each), into a batch."""
        if isinstance(documents, Document) or not isinstance(documents, Sequence) or not documents:
            raise TypeError("documents must be a non-empty sequence of Document (or of "
                            f"PackedRow), got {type(documents).__name__}")
        if all(isinstance(r, PackedRow) for r in documents):
            return self._build([_pieces(r, start) for r, start in
                                zip(documents, _piece_starts(documents), strict=True)], [])
        rows: list[list[_Encoded]] = []
        used, truncated = self.max_length, []
        for i, doc in enumerate(documents):
            enc, cut = self._fit(self._encode(doc, i))
            if cut:
                truncated.append(i)
            if self.pack and rows and used + len(enc.ids) <= self.max_length:
                rows[-1].append(enc)
                used += len(enc.ids)
            else:
                rows.append([enc])
                used = len(enc.ids)
        return self._build(rows, truncated)

    def _build(self, rows: list[list[_Encoded]], truncated: list[int]) -> InterleavedBatch:
        lengths = [sum(len(e.ids) for e in row) for row in rows]
        n = max(self.max_length, *lengths) if self.pad_to_max_length else max(lengths)
        b = len(rows)
        input_ids = torch.full((b, n), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(b, n, dtype=torch.long)
        ignore = torch.zeros(b, n, dtype=torch.bool)
        images, per_image, per_row = [], [], []
        for r, row in enumerate(rows):
            start = 0
            for enc in row:
                end = start + len(enc.ids)
                input_ids[r, start:end] = torch.tensor(enc.ids)
                ignore[r, start:end] = torch.tensor(enc.no_loss)
                first = len(images)
                for j, (s, img) in enumerate(zip(enc.soi, enc.images, strict=True)):
                    per_image.append((r, start + s, start, s > int(enc.opens),
                                      first + j - 1 if j else -1, enc.doc))
                    images.append(img)
                start = end
            attention_mask[r, :start] = 1
            per_row.append(sum(len(e.images) for e in row))
        labels = interleaved_labels(input_ids, bos_id=self.bos_id, soi_id=self.soi_id,
                                    image_id=self.image_id, attention_mask=attention_mask,
                                    ignore=ignore)
        cols = list(zip(*per_image, strict=True)) if per_image else [()] * 6
        return InterleavedBatch(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels,
            images=self._stack(images, per_image), images_per_row=torch.tensor(per_row),
            image_row=torch.tensor(cols[0], dtype=torch.long),
            image_soi=torch.tensor(cols[1], dtype=torch.long),
            image_bos=torch.tensor(cols[2], dtype=torch.long),
            image_has_context=torch.tensor(cols[3], dtype=torch.bool),
            image_previous=torch.tensor(cols[4], dtype=torch.long),
            image_document=torch.tensor(cols[5], dtype=torch.long),
            row_documents=[[e.doc for e in row] for row in rows], truncated=truncated)

    @staticmethod
    def _stack(images: list[torch.Tensor], per_image: list[tuple]) -> torch.Tensor:
        if not images:
            return torch.zeros(0, 0, 0, 0)
        shape = images[0].shape
        for img, info in zip(images, per_image, strict=True):
            if img.shape != shape:
                raise ValueError(f"all images must share one (c, H, W) shape to be stacked: "
                                 f"documents[{per_image[0][5]}] has {tuple(shape)}, "
                                 f"documents[{info[5]}] has {tuple(img.shape)}; resize them first")
        return torch.stack(images)


def _piece_starts(rows: Sequence[Any]) -> list[int]:
    """Batch-wide index of each row's first piece."""
    starts, total = [], 0
    for row in rows:
        starts.append(total)
        total += len(row.segments)
    return starts


def _pieces(row: Any, first: int) -> list[_Encoded]:
    """A [`PackedRow`][mmlayers.data.packing.PackedRow] → its pieces (document parts) as encoded items."""
    bounds = [*row.segments, len(row.input_ids)]
    pieces, j = [], 0
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        soi = [s - a for s in row.soi if a <= s < b]
        pieces.append(_Encoded(first + i, row.input_ids[a:b], row.no_loss[a:b], soi,
                               row.images[j:j + len(soi)], row.opens[i]))
        j += len(soi)
    return pieces
