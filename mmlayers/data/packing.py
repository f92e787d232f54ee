"""Token-level packing into fixed-length rows, and the resumable streaming dataset.

Shape key: b rows · n tokens per row (``max_length``, 2048 in the paper) · k ``<image>``
slots per image.

[`RowPacker`][mmlayers.data.packing.RowPacker] concatenates tokenised documents (``<s>`` … ``</s>``, each image a
``<soi>`` + k ``<image>`` run) into rows of at most ``max_length`` tokens and ``max_images``
images (the paper: 15 for MMC4, 30 for LAION pairs), never cutting an image run:

- ``truncation="image"`` (the official MMC4 setting): a document fills the rest of the row;
  where the row ends, it is cut — in text anywhere, before an image's ``<soi>`` if that
  image would not fit whole or would exceed ``max_images`` — and the rest continues at the
  start of the next row (without a new ``<s>``, as in the official loader). Rows are full
  except where an image did not fit.
- ``truncation="document"`` (the official LAION setting): a document that does not fit in
  the rest of a row starts the next row; only a document longer than a whole row is cut
  (as above).

[`InterleavedStream`][mmlayers.data.packing.InterleavedStream] is a ``torch.utils.data.IterableDataset``: source (sharded over
rank × worker, see `mmlayers.data.streaming`) → tokenise → pack → collate, yielding
[`InterleavedBatch`][mmlayers.data.collate.InterleavedBatch] objects (use ``DataLoader(stream,
batch_size=None)``, or [`StreamingLoader`][mmlayers.data.packing.StreamingLoader]). Each batch carries ``data_state``: its
slot, the source position and token offset where the slot's stream continues, and the
read counts. ``state_dict()`` gathers the latest of every slot, so a resumed run continues
with the next rows — bit for bit, with the same shards, seed, world size and workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmlayers.data.streaming import ReadStats, data_slot

__all__ = ["InterleavedStream", "PackedRow", "RowPacker", "StreamingLoader"]


@dataclass
class PackedRow:
    """One packed token row (what [`InterleavedCollator`][mmlayers.data.collate.InterleavedCollator] takes as a row).

    Attributes:
        input_ids: n token ids.
        no_loss: n bools, True where the token gets no text loss (prompt, caption-first).
        images: the row's images (c, H, W) in order.
        soi: row positions of their ``<soi>`` tokens.
        segments: row positions where each document piece starts.
        opens: per piece, whether it starts with its document's ``<s>`` (False for the
            continuation of a document cut in the previous row).
        state: where the stream continues after this row (``{"at", "offset"}``).

    Examples:
        >>> row = PackedRow(input_ids=[7, 2, 1, 4, 5, 5], no_loss=[False] * 6, images=["img"],
        ...                 soi=[3], segments=[0, 2], opens=[False, True])
        >>> len(row), row.opens  # the end of a document cut earlier, then a new one
        (6, [False, True])
    """

    input_ids: list[int] = field(default_factory=list)
    no_loss: list[bool] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    soi: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    opens: list[bool] = field(default_factory=list)
    state: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


class RowPacker:
    """Encoded documents → [`PackedRow`][mmlayers.data.packing.PackedRow] objects (rules in the module docstring).

    Args:
        max_length: most tokens per row (n).
        num_image_tokens: ``<image>`` slots per image (k).
        max_images: most images per row; ``None``: no limit besides the length.
        truncation: ``"image"`` or ``"document"``.

    Raises:
        ValueError: a bad argument, or ``max_length < k + 1`` (an image run cannot fit).

    Examples:
        >>> from types import SimpleNamespace as Enc
        >>> S, E, SOI, IMG, x = 1, 2, 4, 5, 9
        >>> doc = Enc(ids=[S, x, SOI, IMG, IMG, x, x, E], no_loss=[False] * 8, soi=[2],
        ...           images=["img"])
        >>> packer = RowPacker(max_length=4, num_image_tokens=2)
        >>> rows = list(packer.pack([(doc, "before", "after")]))
        >>> [r.input_ids for r in rows], [r.opens for r in rows]  # <soi> moves to row 2
        ([[1, 9], [4, 5, 5, 9], [9, 2]], [[True], [False], [False]])
        >>> rows[0].state, rows[2].state
        ({'at': 'before', 'offset': 2}, {'at': 'after', 'offset': 0})
    """

    def __init__(self, *, max_length: int = 2048, num_image_tokens: int,
                 max_images: int | None = None, truncation: str = "image") -> None:
        for name, v in (("max_length", max_length), ("num_image_tokens", num_image_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if max_length < num_image_tokens + 1:
            raise ValueError(f"max_length={max_length} cannot hold one image run (<soi> + "
                             f"{num_image_tokens} <image>); raise it")
        if max_images is not None and (isinstance(max_images, bool)
                                       or not isinstance(max_images, int) or max_images < 1):
            raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")
        if truncation not in ("image", "document"):
            raise ValueError(f"truncation must be 'image' or 'document', got {truncation!r}")
        self.max_length, self.k = max_length, num_image_tokens
        self.max_images, self.truncation = max_images, truncation

    def _cut(self, enc: Any, pos: int, room: int, image_room: int) -> int:
        """Largest end ≤ pos + room that cuts no image run and keeps ≤ image_room images."""
        end = min(len(enc.ids), pos + room)
        later = [s for s in enc.soi if s >= pos]
        if len(later) > image_room:
            end = min(end, later[image_room])
        for s in later:
            if s < end < s + 1 + self.k:
                return s
        return end

    def pack(self, items: Iterable[tuple[Any, Any, Any]], *, offset: int = 0
             ) -> Iterator[PackedRow]:
        """Pack ``(encoded, position_before, position_after)`` items, in order.

        ``encoded`` has ``ids``, ``no_loss``, ``soi``, ``images`` (see
        [`encode`][mmlayers.data.collate.InterleavedCollator.encode]); the positions are opaque marks
        copied into ``PackedRow.state``. ``offset`` skips that many tokens of the first
        document (resuming inside a document). The last row may be shorter.
        """
        row, limit = PackedRow(), self.max_images or float("inf")
        last_after: Any = None
        for enc, before, after in items:
            pos = offset
            offset = 0
            while pos < len(enc.ids):
                room, image_room = self.max_length - len(row), limit - len(row.images)
                rest = [s for s in enc.soi if s >= pos]
                if len(enc.ids) - pos <= room and len(rest) <= image_room:
                    self._add(row, enc, pos, len(enc.ids))
                    break
                if self.truncation == "document" and pos == 0 and row.segments:
                    end = pos  # start a new row with this document
                else:
                    end = self._cut(enc, pos, room, image_room)
                if end > pos:
                    self._add(row, enc, pos, end)
                    pos = end
                if not row.segments:
                    raise ValueError(f"cannot place tokens {pos}.. of a document in an empty row "
                                     f"(max_length={self.max_length}, k={self.k})")
                row.state = {"at": before, "offset": pos}
                yield row
                row = PackedRow()
            last_after = after
        if row.segments:
            row.state = {"at": last_after, "offset": 0}
            yield row

    @staticmethod
    def _add(row: PackedRow, enc: Any, start: int, end: int) -> None:
        base = len(row) - start
        taken = [(s, img) for s, img in zip(enc.soi, enc.images, strict=True) if start <= s < end]
        row.segments.append(len(row))
        row.opens.append(start == 0)
        row.input_ids += enc.ids[start:end]
        row.no_loss += enc.no_loss[start:end]
        row.soi += [s + base for s, _ in taken]
        row.images += [img for _, img in taken]


class InterleavedStream(IterableDataset):
    """Source → tokenise → pack → collate, per rank × worker slot; resumable.

    Args:
        source: a [`ShardedSource`][mmlayers.data.streaming.ShardedSource] or [`Mixture`][mmlayers.data.streaming.Mixture].
        collator: an [`InterleavedCollator`][mmlayers.data.collate.InterleavedCollator] (its tokenizer,
            ``num_image_tokens`` and ``max_length`` are used).
        batch_size: rows per batch (b).
        max_images: most images per row (the paper: 15 MMC4, 30 LAION); None: no limit.
        truncation: ``"image"`` or ``"document"`` (see [`RowPacker`][mmlayers.data.packing.RowPacker]).
        rank: data-parallel rank; default from ``torch.distributed`` or the ``RANK``
            environment variable.
        world_size: data-parallel size; default from ``torch.distributed`` or the
            ``WORLD_SIZE`` environment variable.
        drop_last: drop a final batch with fewer than ``batch_size`` rows.

    Every iteration continues from the last position consumed (see [`observe`][mmlayers.data.packing.InterleavedStream.observe]);
    [`reset`][mmlayers.data.packing.InterleavedStream.reset] starts over.

    Examples:
        >>> import torch
        >>> from mmlayers.data import (Document, InterleavedCollator, ShardedSource,
        ...                            word_level_tokenizer)
        >>> def reader(path, *, start, select, seed, stats):
        ...     for i in range(start, 4):
        ...         yield i, Document([f"text {i}.", torch.zeros(3, 4, 4)])
        >>> tok = word_level_tokenizer(["text 0 1 2 3."])
        >>> collate = InterleavedCollator(tokenizer=tok, num_image_tokens=2, max_length=12)
        >>> stream = InterleavedStream(ShardedSource(["s0"], reader), collate, batch_size=2)
        >>> first = next(iter(stream))
        >>> first.input_ids.shape, first.data_state["at"]["position"]
        (torch.Size([2, 12]), {'round': 0, 'epoch': 0, 'shard': 0, 'record': 3})
        >>> rest = list(stream)  # continues after the first batch
        >>> [b.input_ids.shape[0] for b in rest]  # the last, partial row
        [1]
    """

    def __init__(self, source: Any, collator: Any, *, batch_size: int,
                 max_images: int | None = None, truncation: str = "image",
                 rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not hasattr(source, "iterate"):
            raise TypeError(f"source must be a ShardedSource or Mixture, got "
                            f"{type(source).__name__}")
        self.source, self.collator, self.batch_size = source, collator, batch_size
        self.packer = RowPacker(max_length=collator.max_length,
                                num_image_tokens=collator.num_image_tokens,
                                max_images=max_images, truncation=truncation)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self._num_slots: int | None = None
        self._slots: dict[int, dict[str, Any]] = {}
        self._last_slot: int | None = None

    # ------------------------------------------------------------------ iteration
    def _documents(self, slot: int, num_slots: int, saved: dict | None):
        mark = (saved or {}).get("at") or {"position": None, "stats": {}}
        stats = {k: ReadStats(v) for k, v in mark["stats"].items()}
        before = mark
        for doc, position in self.source.iterate(slot, num_slots, mark["position"], stats):
            after = {"position": position, "stats": {k: dict(v) for k, v in stats.items()}}
            yield self.collator.encode(doc), before, after
            before = after

    def __iter__(self) -> Iterator[Any]:
        slot, num_slots = data_slot(self.rank, self.world_size)
        if self._num_slots is not None and self._num_slots != num_slots:
            raise ValueError(f"the saved data position is for {self._num_slots} slots (ranks × "
                             f"workers) but this run has {num_slots}; resume with the same "
                             f"world size and number of dataloader workers")
        self._num_slots = num_slots
        info = get_worker_info()
        workers = 1 if info is None else info.num_workers
        if self._last_slot is not None and workers > 1:
            # a DataLoader starts with worker 0: give it the slot whose turn is next, so a
            # resumed run yields batches in the order of an uninterrupted one
            shift, w = (self._last_slot % workers + 1) % workers, slot % workers
            slot = slot - w + (w + shift) % workers
        saved = self._slots.get(slot)
        rows = self.packer.pack(self._documents(slot, num_slots, saved),
                                offset=(saved or {}).get("offset", 0))
        batch: list[PackedRow] = []
        for row in rows:
            batch.append(row)
            if len(batch) == self.batch_size:
                yield self._collate(batch, slot, num_slots)
                batch = []
        if batch and not self.drop_last:
            yield self._collate(batch, slot, num_slots)

    def _collate(self, rows: list[PackedRow], slot: int, num_slots: int) -> Any:
        out = self.collator(rows)
        out.data_state = {"slot": slot, "num_slots": num_slots, **rows[-1].state}
        self.observe(out)
        return out

    # ------------------------------------------------------------------ position
    def observe(self, batch: Any) -> None:
        """Record that ``batch`` was consumed (done for you without workers and by
        [`StreamingLoader`][mmlayers.data.packing.StreamingLoader]; call it yourself after a plain ``DataLoader``)."""
        state = getattr(batch, "data_state", None)
        if not isinstance(state, dict) or "slot" not in state:
            raise ValueError("batch has no data_state; it did not come from an InterleavedStream")
        self._num_slots, self._last_slot = state["num_slots"], state["slot"]
        self._slots[state["slot"]] = {"at": state["at"], "offset": state["offset"]}

    def state_dict(self) -> dict[str, Any]:
        """The consumed position of every slot (plain Python values; save it with the
        checkpoint)."""
        return {"num_slots": self._num_slots, "last_slot": self._last_slot,
                "slots": {s: {"at": v["at"], "offset": v["offset"]} for s, v in self._slots.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from [`state_dict`][mmlayers.data.packing.InterleavedStream.state_dict]) at the next iteration."""
        if not isinstance(state, dict) or "slots" not in state:
            raise ValueError(f"expected a dict from InterleavedStream.state_dict(), got {state!r}")
        self._num_slots, self._last_slot = state["num_slots"], state.get("last_slot")
        self._slots = {int(s): dict(v) for s, v in state["slots"].items()}

    def reset(self) -> None:
        """Forget the position: the next iteration starts from the beginning."""
        self._num_slots, self._slots, self._last_slot = None, {}, None

    def stats(self) -> dict[str, ReadStats]:
        """Read counts per source, summed over the slots consumed so far."""
        total: dict[str, ReadStats] = {}
        for v in self._slots.values():
            for name, counts in ((v.get("at") or {}).get("stats") or {}).items():
                total.setdefault(name, ReadStats()).update(counts)
        return total


class StreamingLoader:
    """A ``DataLoader`` over an [`InterleavedStream`][mmlayers.data.packing.InterleavedStream] that records what was consumed.

    Args:
        stream: the stream.
        num_workers: dataloader worker processes (each is its own slot).
        **kwargs: passed to ``torch.utils.data.DataLoader`` (``batch_size`` is None: the
            stream batches). ``persistent_workers`` must stay False: a persistent worker
            would start its next pass from what it *produced*, prefetched batches included,
            not from what the loop consumed.

    Raises:
        TypeError: ``stream`` is not an [`InterleavedStream`][mmlayers.data.packing.InterleavedStream].
        ValueError: ``persistent_workers=True`` or a ``batch_size``.

    ``state_dict()`` / ``load_state_dict()`` / ``stats()`` forward to the stream.

    Examples:
        >>> import torch
        >>> from mmlayers.data import (Document, InterleavedCollator, ShardedSource,
        ...                            word_level_tokenizer)
        >>> def reader(path, *, start, select, seed, stats):
        ...     for i in range(start, 6):
        ...         if select is None or select(i):
        ...             yield i, Document([f"{path} {i}.", torch.zeros(3, 4, 4)])
        >>> tok = word_level_tokenizer(["a b 0 1 2 3 4 5."])
        >>> collate = InterleavedCollator(tokenizer=tok, num_image_tokens=2, max_length=16)
        >>> stream = InterleavedStream(ShardedSource(["a", "b"], reader, shuffle=False),
        ...                            collate, batch_size=2)
        >>> loader = StreamingLoader(stream, num_workers=2)
        >>> [b.data_state["slot"] for b in loader]  # worker 0 reads shard a, worker 1 shard b
        [0, 1, 0, 1]
        >>> loader.state_dict()["slots"][1]["at"]["position"]  # first shard, read through
        {'round': 0, 'epoch': 0, 'shard': 0, 'record': 6}
    """

    def __init__(self, stream: InterleavedStream, *, num_workers: int = 0, **kwargs: Any) -> None:
        if not isinstance(stream, InterleavedStream):
            raise TypeError(f"stream must be an InterleavedStream, got {type(stream).__name__}")
        if kwargs.get("persistent_workers") or kwargs.get("batch_size") is not None:
            raise ValueError(f"StreamingLoader needs persistent_workers=False and no batch_size "
                             f"(the stream batches), got persistent_workers="
                             f"{kwargs.get('persistent_workers')}, batch_size="
                             f"{kwargs.get('batch_size')}")
        self.stream = stream
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.stream.observe(batch)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """See [`InterleavedStream.state_dict`][mmlayers.data.packing.InterleavedStream.state_dict]."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See [`InterleavedStream.load_state_dict`][mmlayers.data.packing.InterleavedStream.load_state_dict]."""
        self.stream.load_state_dict(state)

    def stats(self) -> dict[str, ReadStats]:
        """See [`InterleavedStream.stats`][mmlayers.data.packing.InterleavedStream.stats]."""
        return self.stream.stats()
