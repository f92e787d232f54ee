"""Streaming documents from shard files: sharding over ranks × workers, mixing, resuming.

A *source* turns shard files into a stream of [`Document`][mmlayers.data.document.Document] objects with a
*reader* ([`MMC4Reader`][mmlayers.data.mmc4.MMC4Reader], [`PairReader`][mmlayers.data.pairs.PairReader] or any
callable with the same signature). Every stream is deterministic given its seed and
position, and every yielded document comes with the position *after* it, a small dict of
ints, so a run can be resumed exactly where it stopped:

- **Sharding.** Data-parallel rank r of R and dataloader worker w of W read through one
  *slot* ``g = r · W + w`` of ``R · W``. With at least ``R · W`` shards, slot g reads shards
  ``g, g + R·W, …`` of the epoch's order (shuffled by ``seed`` and the epoch); with fewer,
  every slot reads every shard and keeps records ``i`` with ``i mod R·W = g``. Either way
  each record is read by exactly one slot per epoch.
- **Mixing.** [`Mixture`][mmlayers.data.streaming.Mixture] draws the source of each next document with fixed
  probabilities; draw t of slot g uses its own seeded generator, so the position is the
  number of draws plus each source's position. ``"all_exhausted"`` (the official recipe's
  ``"longest"``) restarts a finished source until every source has finished once;
  ``"first_exhausted"`` stops with the first.
- **Counting.** Records a reader skips (malformed lines, unreadable images, filtered
  documents) are counted in a [`ReadStats`][mmlayers.data.streaming.ReadStats] per source, never silently dropped.

Positions are only valid for the same shard list, seed, and number of slots.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["Mixture", "ReadStats", "ShardedSource", "data_slot"]

logger = logging.getLogger(__name__)

Position = dict[str, Any]


class ReadStats(Counter):
    """Counts of what a reader read, kept and skipped, by reason (a ``collections.Counter``).

    Keys used by the readers: ``records`` (lines / samples read), ``documents`` (yielded),
    ``images`` (images in the yielded documents); whole records skipped, by reason:
    ``bad_json``, ``bad_record``, ``no_image``, ``single_image_dropped`` (MMC4),
    ``missing_image``, ``unreadable_image``, ``missing_caption`` (pairs); single images
    dropped from a kept MMC4 document: ``low_similarity``, ``extra_images``,
    ``bad_image_info``, ``missing_image``, ``unreadable_image``; ``unreadable_shard``.

    Examples:
        >>> stats = ReadStats()
        >>> stats["records"] += 3; stats["documents"] += 2; stats["bad_json"] += 1
        >>> stats.skipped, dict(stats)
        (1, {'records': 3, 'documents': 2, 'bad_json': 1})
    """

    @property
    def skipped(self) -> int:
        """Records read but not turned into a document (``records − documents``)."""
        return self["records"] - self["documents"]


def data_slot(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(slot, num_slots)`` of the calling process: rank × dataloader workers.

    ``rank`` / ``world_size`` default to ``torch.distributed`` when it is initialised, else
    to the ``RANK`` / ``WORLD_SIZE`` environment variables, else 0 / 1.

    Examples:
        >>> data_slot(rank=1, world_size=2)  # outside a dataloader worker
        (1, 2)
    """
    import torch.distributed as dist
    from torch.utils.data import get_worker_info

    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() \
            else int(os.environ.get("WORLD_SIZE", 1))
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() \
            else int(os.environ.get("RANK", 0))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    info = get_worker_info()
    workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
    return rank * workers + worker, world_size * workers


def _check_slot(slot: int, num_slots: int) -> None:
    if not (isinstance(num_slots, int) and num_slots >= 1 and isinstance(slot, int)
            and 0 <= slot < num_slots):
        raise ValueError(f"slot must lie in [0, num_slots) with num_slots ≥ 1, got slot={slot!r}, "
                         f"num_slots={num_slots!r}")


class ShardedSource:
    """Documents from shard files, split over slots, in a seeded order, resumable.

    Args:
        shards: shard file paths (their order is the unshuffled order).
        reader: callable ``reader(path, *, start, select, seed, stats)`` yielding
            ``(record_index, Document)`` from record ``start`` on, only for records where
            ``select(index)`` is true (``select=None``: all), randomised by ``seed`` (str),
            counting into ``stats`` ([`ReadStats`][mmlayers.data.streaming.ReadStats]).
        name: the key of this source's counts in the stats dict.
        shuffle: shuffle the shard order every epoch (seeded).
        seed: base seed of the shard order and of the reader's per-record randomness.
        epochs: passes over the data; ``None`` streams forever.

    Position: ``{"round", "epoch", "shard", "record"}``: ``shard`` indexes the slot's own
    shards of that epoch, ``record`` is the next record to read in it, ``round`` counts
    restarts by a [`Mixture`][mmlayers.data.streaming.Mixture].

    Raises:
        ValueError: no shards, or ``epochs`` not a positive int or None.
        TypeError: ``reader`` not callable.

    Examples:
        >>> def reader(path, *, start, select, seed, stats):
        ...     for i in range(start, 3):
        ...         if select is None or select(i):
        ...             yield i, f"{path}:{i}"
        >>> src = ShardedSource(["a", "b", "c"], reader, shuffle=False)
        >>> [d for d, _ in src.iterate(0, 2)], [d for d, _ in src.iterate(1, 2)]
        (['a:0', 'a:1', 'a:2', 'c:0', 'c:1', 'c:2'], ['b:0', 'b:1', 'b:2'])
        >>> [d for d, _ in src.iterate(0, 4)]  # fewer shards than slots: split records
        ['a:0', 'b:0', 'c:0']
    """

    def __init__(self, shards: Sequence[str | os.PathLike], reader: Callable[..., Iterator],
                 *, name: str = "data", shuffle: bool = True, seed: int = 0,
                 epochs: int | None = 1) -> None:
        if isinstance(shards, (str, os.PathLike)) or not shards:
            raise ValueError(f"shards must be a non-empty list of paths, got {shards!r}")
        if not callable(reader):
            raise TypeError(f"reader must be callable, got {type(reader).__name__}")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                                   or epochs < 1):
            raise ValueError(f"epochs must be a positive int or None (forever), got {epochs!r}")
        self.shards = [os.fspath(s) for s in shards]
        self.reader, self.name, self.shuffle = reader, name, shuffle
        self.seed, self.epochs = seed, epochs

    def assignment(self, epoch: int, slot: int, num_slots: int, round: int = 0
                   ) -> tuple[list[str], Callable[[int], bool] | None]:
        """The shards slot ``slot`` reads in ``epoch`` and its record filter (None: all)."""
        _check_slot(slot, num_slots)
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{round}:{epoch}").shuffle(order)
        if len(order) >= num_slots:
            return order[slot::num_slots], None
        return order, lambda i: i % num_slots == slot

    def iterate(self, slot: int, num_slots: int, position: Position | None = None,
                stats: dict[str, ReadStats] | None = None) -> Iterator[tuple[Any, Position]]:
        """``(document, position after it)`` for one slot, from ``position`` on."""
        pos = {"round": 0, "epoch": 0, "shard": 0, "record": 0, **(position or {})}
        counts = (stats if stats is not None else {}).setdefault(self.name, ReadStats())
        rnd, epoch, j, start = pos["round"], pos["epoch"], pos["shard"], pos["record"]
        while self.epochs is None or epoch < self.epochs:
            paths, select = self.assignment(epoch, slot, num_slots, rnd)
            yielded = j > 0 or start > 0  # a resumed epoch proves nothing about emptiness
            while j < len(paths):
                for i, doc in self.reader(paths[j], start=start, select=select,
                                          seed=f"{self.seed}:{rnd}:{epoch}", stats=counts):
                    yielded = True
                    yield doc, {"round": rnd, "epoch": epoch, "shard": j, "record": i + 1}
                j, start = j + 1, 0
            if not yielded and self.epochs is None:
                logger.warning("source %r: slot %d of %d read no document in epoch %d; "
                               "stopping instead of looping forever", self.name, slot,
                               num_slots, epoch)
                return
            epoch, j = epoch + 1, 0


class Mixture:
    """Documents drawn from several sources with fixed probabilities (seeded, resumable).

    Args:
        sources: objects with ``name`` and ``iterate(slot, num_slots, position, stats)``
            ([`ShardedSource`][mmlayers.data.streaming.ShardedSource] or another [`Mixture`][mmlayers.data.streaming.Mixture]); names must differ.
        probs: relative weights (normalised), default equal; the paper mixes
            ``[1, 1, 1, 2]`` (three LAION sets, MMC4).
        seed: seeds the draws (draw t of slot g is a function of seed, g and t).
        stopping: ``"all_exhausted"`` restarts finished sources (next round) until each has
            finished once; ``"first_exhausted"`` stops when any source finishes.

    Position: ``{"draws", "sources": [per-source position or None], "done": [bool]}``.

    Raises:
        ValueError: empty or mismatched ``probs``, a non-positive weight, duplicate names, an
            unknown ``stopping``.

    Examples:
        >>> def reader(path, *, start, select, seed, stats):
        ...     yield from ((i, f"{path}{i}") for i in range(start, 2))
        >>> mix = Mixture([ShardedSource(["a"], reader, name="a"),
        ...                ShardedSource(["b"], reader, name="b")], probs=[1, 1], seed=1)
        >>> [d for d, _ in mix.iterate(0, 1)]  # "b" restarts until "a" has finished too
        ['a0', 'b0', 'a1', 'b1', 'b0']
    """

    def __init__(self, sources: Sequence[Any], probs: Sequence[float] | None = None, *,
                 seed: int = 0, stopping: str = "all_exhausted") -> None:
        if not sources:
            raise ValueError("sources must be a non-empty list")
        probs = [1.0] * len(sources) if probs is None else [float(p) for p in probs]
        if len(probs) != len(sources) or any(not p > 0 for p in probs):
            raise ValueError(f"probs must hold one positive weight per source ({len(sources)}), "
                             f"got {probs}")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must differ (they key the stats), got {names}")
        if stopping not in ("all_exhausted", "first_exhausted"):
            raise ValueError(f"stopping must be 'all_exhausted' or 'first_exhausted', got "
                             f"{stopping!r}")
        total = sum(probs)
        self.sources, self.probs = list(sources), [p / total for p in probs]
        self.seed, self.stopping, self.name = seed, stopping, "+".join(names)

    def draw(self, slot: int, t: int) -> int:
        """Index of the source of draw ``t`` in slot ``slot``."""
        u, acc = random.Random(f"mix:{self.seed}:{slot}:{t}").random(), 0.0
        for i, p in enumerate(self.probs):
            acc += p
            if u < acc:
                return i
        return len(self.probs) - 1

    def iterate(self, slot: int, num_slots: int, position: Position | None = None,
                stats: dict[str, ReadStats] | None = None) -> Iterator[tuple[Any, Position]]:
        """``(document, position after it)`` for one slot, from ``position`` on."""
        _check_slot(slot, num_slots)
        k = len(self.sources)
        stats = stats if stats is not None else {}
        pos = position or {}
        draws = pos.get("draws", 0)
        states = list(pos.get("sources", [None] * k))
        done = list(pos.get("done", [False] * k))
        iters: list[Iterator | None] = [None] * k
        while not all(done):
            i = self.draw(slot, draws)
            draws += 1
            if iters[i] is None:
                iters[i] = self.sources[i].iterate(slot, num_slots, states[i], stats)
            item = next(iters[i], None)
            if item is None:  # source i finished: restart it in its next round
                done[i] = True
                if self.stopping == "first_exhausted":
                    return
                rnd = (states[i] or {}).get("round", 0) + 1
                states[i] = {"round": rnd}
                if all(done):
                    return
                iters[i] = self.sources[i].iterate(slot, num_slots, states[i], stats)
                item = next(iters[i], None)
                if item is None:
                    return
            doc, states[i] = item
            yield doc, {"draws": draws, "sources": list(states), "done": list(done)}
