"""MMC4 interleaved documents: JSONL shards + a local image folder → Documents.

Shape key: c channels · H, W image size.

One JSON object per line (the MMC4 release format)::

    {"text_list": ["sentence 0", "sentence 1", ...],
     "image_info": [{"image_name": "abc.jpg", "matched_text_index": 1,
                     "matched_sim": 0.31}, ...], ...}

Shards may be plain ``.jsonl``, gzipped (``.jsonl.gz``) or zipped (``.jsonl.zip``, one file
inside, as MMC4 is distributed). Images are read from ``image_root / image_name``. The filtering follows the official
MM-Interleaved loader (values of its pre-training config as defaults):

1. images whose ``matched_sim`` is below ``sim_threshold`` (0.24) are dropped;
2. of the rest, at most ``max_images`` (6) are kept, chosen at random among those that
   load, then put back in sentence order;
3. a document left with no image is skipped; one with a single image is kept with
   probability ``single_image_keep`` (0.5);
4. each image goes right before its matched sentence with probability
   ``image_first_prob`` (0.5), else right after it.

Randomness is seeded per record (seed, shard file name, line number), so the same record
always gives the same document: runs are reproducible and resumable. Malformed lines,
missing or unreadable images and filtered documents are skipped and counted in a
[`ReadStats`][mmlayers.data.streaming.ReadStats]; nothing is skipped uncounted.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import random
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

from mmlayers._optional import require
from mmlayers.data.document import Document
from mmlayers.data.streaming import ReadStats

__all__ = ["MMC4Reader", "load_image"]

logger = logging.getLogger(__name__)


def load_image(source: Any, image_size: int | None) -> Any:
    """Open an image (path or file object), convert to RGB and resize to a square tensor.

    Args:
        source: a path or a binary file object PIL can open.
        image_size: side of the (c, H, W) output; ``None`` keeps the size.

    Returns:
        float32 (3, image_size, image_size) in [0, 1].

    Raises:
        Exception: whatever PIL raises for a missing or undecodable image (readers catch
            and count it).

    Examples:
        >>> import io
        >>> from PIL import Image
        >>> buf = io.BytesIO(); Image.new("RGB", (8, 4), (255, 0, 0)).save(buf, "PNG")
        >>> t = load_image(io.BytesIO(buf.getvalue()), 6)
        >>> tuple(t.shape), round(float(t[0].mean()), 3)
        ((3, 6, 6), 1.0)
    """
    require("PIL", "data")
    from PIL import Image

    from mmlayers.data.document import image_to_tensor

    with Image.open(source) as im:
        im = im.convert("RGB")
        if image_size is not None:
            im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return image_to_tensor(im).clamp_(0, 1)


def _open_text(path: str | os.PathLike) -> io.TextIOBase:
    """A text stream over a ``.jsonl`` file, a ``.gz`` of one, or a ``.zip`` holding one."""
    path = os.fspath(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if path.endswith(".zip"):
        archive = zipfile.ZipFile(path)
        names = [n for n in archive.namelist() if not n.endswith("/")]
        if len(names) != 1:
            archive.close()
            raise ValueError(f"{path}: expected one JSONL file in the zip, found {names}")
        member = archive.open(names[0])
        archive.close()  # the member keeps the file open until it is closed itself
        return io.TextIOWrapper(member, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _check_prob(name: str, p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


class MMC4Reader:
    """Read MMC4 JSONL shards into [`Document`][mmlayers.data.document.Document] objects (module docstring).

    Args:
        image_root: folder holding the images named in ``image_info``.
        sim_threshold: drop images whose ``matched_sim`` is below it.
        max_images: most images kept per document.
        single_image_keep: probability of keeping a document with a single image.
        image_first_prob: probability that an image precedes its sentence.
        image_size: images are resized to (3, image_size, image_size); None keeps sizes.
        transform: optional ``path → (c, H, W) tensor`` replacing the default loading.
            An ``OSError`` it raises (an unreadable file) counts the image as
            ``unreadable_image`` and skips it; any other exception is a bug in the
            transform and propagates, with a note naming the image.
        seed: base seed (a [`ShardedSource`][mmlayers.data.streaming.ShardedSource] passes its own per epoch).

    Call it as ``reader(path, start=0, select=None, seed=None, stats=None)``: yields
    ``(line_index, Document)``; ``Document.meta`` holds ``source`` (``"file:line"``, the
    file name without ``.gz`` / ``.zip``, which also seeds the record's randomness) and
    ``image_names``. [`read`][mmlayers.data.mmc4.MMC4Reader.read] returns the documents of a shard as a list.

    Raises:
        ValueError: a probability outside [0, 1], a non-positive ``max_images``,
            ``image_root`` not a folder.

    Examples:
        >>> import json, os, tempfile
        >>> from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> Image.new("RGB", (8, 8), "red").save(os.path.join(root, "a.png"))
        >>> line = {"text_list": ["A red square.", "The end."], "image_info": [
        ...     {"image_name": "a.png", "matched_text_index": 0, "matched_sim": 0.3},
        ...     {"image_name": "b.png", "matched_text_index": 1, "matched_sim": 0.1}]}
        >>> with open(os.path.join(root, "shard.jsonl"), "w") as f:
        ...     _ = f.write(json.dumps(line) + "\\n" + "not json\\n")
        >>> reader = MMC4Reader(root, image_size=4, single_image_keep=1.0, image_first_prob=1.0)
        >>> stats = ReadStats()
        >>> docs = reader.read(os.path.join(root, "shard.jsonl"), stats=stats)
        >>> [x if isinstance(x, str) else tuple(x.shape) for x in docs[0].items]
        [(3, 4, 4), 'A red square. The end.']
        >>> dict(stats)
        {'records': 2, 'low_similarity': 1, 'images': 1, 'documents': 1, 'bad_json': 1}
    """

    def __init__(self, image_root: str | os.PathLike, *, sim_threshold: float = 0.24,
                 max_images: int = 6, single_image_keep: float = 0.5,
                 image_first_prob: float = 0.5, image_size: int | None = 224,
                 transform: Callable[[str], Any] | None = None, seed: int = 0) -> None:
        if not os.path.isdir(image_root):
            raise ValueError(f"image_root must be an existing folder, got {image_root!r}")
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be a positive int, got {max_images!r}")
        if not isinstance(sim_threshold, (int, float)):
            raise ValueError(f"sim_threshold must be a number, got {sim_threshold!r}")
        self.image_root, self.sim_threshold = os.fspath(image_root), float(sim_threshold)
        self.max_images = max_images
        self.single_image_keep = _check_prob("single_image_keep", single_image_keep)
        self.image_first_prob = _check_prob("image_first_prob", image_first_prob)
        self.image_size, self.transform, self.seed = image_size, transform, seed

    def read(self, path: str | os.PathLike, *, stats: ReadStats | None = None) -> list[Document]:
        """All documents of one shard, in order."""
        return [doc for _, doc in self(path, stats=stats)]

    def __call__(self, path: str | os.PathLike, *, start: int = 0,
                 select: Callable[[int], bool] | None = None, seed: Any = None,
                 stats: ReadStats | None = None) -> Iterator[tuple[int, Document]]:
        stats = stats if stats is not None else ReadStats()
        seed = self.seed if seed is None else seed
        name = os.path.basename(os.fspath(path)).removesuffix(".gz").removesuffix(".zip")
        try:
            f = _open_text(path)
        except (OSError, zipfile.BadZipFile, ValueError) as e:
            stats["unreadable_shard"] += 1
            logger.warning("cannot open MMC4 shard %s: %s", path, e)
            return
        lines, i = enumerate(f), -1
        with f:
            while True:
                try:
                    i, line = next(lines)
                except StopIteration:
                    return
                except (OSError, EOFError, zipfile.BadZipFile) as e:  # a truncated archive
                    stats["unreadable_shard"] += 1
                    logger.warning("MMC4 shard %s: stopped after line %d: %s", path, i, e)
                    return
                if i < start or not line.strip() or (select is not None and not select(i)):
                    continue
                stats["records"] += 1
                doc = self._document(line, random.Random(f"mmc4:{seed}:{name}:{i}"), stats)
                if doc is not None:
                    doc.meta["source"] = f"{name}:{i}"
                    stats["documents"] += 1
                    yield i, doc

    def _document(self, line: str, rng: random.Random, stats: ReadStats) -> Document | None:
        try:
            record = json.loads(line)
        except ValueError:
            stats["bad_json"] += 1
            return None
        texts = record.get("text_list") if isinstance(record, dict) else None
        infos = record.get("image_info") if isinstance(record, dict) else None
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)
                and isinstance(infos, list) and all(isinstance(x, dict) for x in infos)):
            stats["bad_record"] += 1
            return None
        candidates = []
        for info in infos:
            j, sim, image = (info.get("matched_text_index"), info.get("matched_sim"),
                             info.get("image_name"))
            if not (isinstance(j, int) and 0 <= j < len(texts) and isinstance(sim, (int, float))
                    and isinstance(image, str)):
                stats["bad_image_info"] += 1
            elif sim < self.sim_threshold:
                stats["low_similarity"] += 1
            else:
                candidates.append((j, image))
        rng.shuffle(candidates)
        kept = []
        for j, image in candidates:
            if len(kept) == self.max_images:
                stats["extra_images"] += 1
                continue
            tensor = self._load(image, stats)
            if tensor is not None:
                kept.append((j, image, tensor))
        if not kept:
            stats["no_image"] += 1
            return None
        if len(kept) == 1 and rng.random() >= self.single_image_keep:
            stats["single_image_dropped"] += 1
            return None
        kept.sort(key=lambda x: x[0])  # stable: images of one sentence keep their draw order
        before: dict[int, list] = {}
        after: dict[int, list] = {}
        for j, _, tensor in kept:
            (before if rng.random() < self.image_first_prob else after).setdefault(j, []).append(tensor)
        items: list[Any] = []
        text: list[str] = []
        for j, sentence in enumerate(texts):
            for group, is_text in ((before.get(j, []), False), ([sentence], True),
                                   (after.get(j, []), False)):
                if is_text:
                    if sentence.strip():
                        text.append(sentence.strip())
                    continue
                if group and text:
                    items.append(" ".join(text))
                    text = []
                items += group
        if text:
            items.append(" ".join(text))
        stats["images"] += len(kept)
        return Document(items, meta={"image_names": [name for _, name, _ in kept]})

    def _load(self, image: str, stats: ReadStats) -> Any:
        path = os.path.join(self.image_root, image)
        if not os.path.isfile(path):
            stats["missing_image"] += 1
            return None
        if self.transform is None:
            try:
                return load_image(path, self.image_size)
            except Exception as e:  # noqa: BLE001 - any decoding failure is counted, not fatal
                stats["unreadable_image"] += 1
                logger.debug("unreadable image %s: %s", path, e)
                return None
        try:
            return self.transform(path)
        except OSError as e:  # the file cannot be read or decoded (PIL's errors included)
            stats["unreadable_image"] += 1
            logger.debug("unreadable image %s: %s", path, e)
            return None
        except Exception as e:
            e.add_note(f"raised by MMC4Reader's transform on {path}; only an OSError (an "
                       f"unreadable file) is counted and skipped, other errors surface")
            raise
