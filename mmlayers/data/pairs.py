"""Image-text pairs from webdataset-style tar shards → Documents (stdlib ``tarfile`` only).

Shape key: c channels · H, W image size.

A shard is a tar file whose members are grouped into samples by *key*: the member path up
to the first dot of its file name (``000017.jpg``, ``000017.txt`` → key ``000017``;
consecutive members with one key form one sample, as in webdataset). A sample needs an
image (``jpg``, ``jpeg``, ``png`` or ``webp``) and a caption (``txt``, or ``caption`` in a
``json`` member). Following the official LAION loader, captions are lower-cased and the
caption goes before the image with probability ``caption_first_prob`` (0.5), after it
otherwise; a caption placed first is a text-to-image sample
(``Document.caption_first``: no text loss on it) unless ``train_caption_first`` is set.

Randomness is seeded per sample (seed, shard name, sample index). Samples without an image
or caption, or whose image does not decode, are skipped and counted in a
[`ReadStats`][mmlayers.data.streaming.ReadStats]; an unreadable or truncated tar stops that shard only
(counted as ``unreadable_shard``; its last, possibly incomplete sample is not yielded).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

from mmlayers.data.document import Document
from mmlayers.data.mmc4 import load_image
from mmlayers.data.streaming import ReadStats

__all__ = ["IMAGE_EXTENSIONS", "PairReader", "tar_samples"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _split_key(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower() if dot else ""


def tar_samples(path: str | os.PathLike, *, start: int = 0,
                select: Callable[[int], bool] | None = None,
                stats: ReadStats | None = None) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """``(index, key, {extension: bytes})`` for each sample of a tar shard, in order.

    Samples before ``start`` or not selected are passed over without reading their bytes.

    Examples:
        >>> import io, tarfile, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "s.tar")
        >>> with tarfile.open(path, "w") as tar:
        ...     for name, data in [("a.txt", b"x"), ("a.jpg", b"j"), ("b.txt", b"y")]:
        ...         info = tarfile.TarInfo(name); info.size = len(data)
        ...         tar.addfile(info, io.BytesIO(data))
        >>> [(i, k, sorted(s)) for i, k, s in tar_samples(path)]
        [(0, 'a', ['jpg', 'txt']), (1, 'b', ['txt'])]
    """
    stats = stats if stats is not None else ReadStats()
    index, key, sample = -1, None, {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if k != key or ext in sample:
                    if key is not None and index >= start and (select is None or select(index)):
                        yield index, key, sample
                    index, key, sample = index + 1, k, {}
                if index >= start and (select is None or select(index)):
                    member_file = tar.extractfile(member)
                    sample[ext] = member_file.read() if member_file is not None else b""
                else:
                    sample[ext] = b""  # placeholder: the sample is passed over
            # a tar ends with zero blocks; a file cut at a header boundary does not
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(512) != bytes(512):
                raise tarfile.ReadError("no end-of-archive block: the file is truncated")
    except (OSError, tarfile.TarError, EOFError) as e:
        stats["unreadable_shard"] += 1
        logger.warning("tar shard %s: stopped at sample %d: %s", path, max(index, 0), e)
        return
    if key is not None and index >= start and (select is None or select(index)):
        yield index, key, sample


class PairReader:
    """Read image-text pairs from tar shards into [`Document`][mmlayers.data.document.Document] objects.

    Args:
        caption_first_prob: probability that the caption precedes the image.
        train_caption_first: train the text loss on a caption placed first (the official
            recipe does so for BLIP-captioned LAION, not for LAION-en / LAION-COCO).
        lowercase: lower-case captions (as the official loader does).
        image_size: images are resized to (3, image_size, image_size); None keeps sizes.
        seed: base seed (a [`ShardedSource`][mmlayers.data.streaming.ShardedSource] passes its own per epoch).

    Call it as ``reader(path, start=0, select=None, seed=None, stats=None)``: yields
    ``(sample_index, Document)``; ``Document.meta["source"]`` is ``"file:key"``.
    [`read`][mmlayers.data.pairs.PairReader.read] returns the documents of a shard as a list.

    Raises:
        ValueError: a probability outside [0, 1].

    Examples:
        >>> import io, os, tarfile, tempfile
        >>> from PIL import Image
        >>> buf = io.BytesIO(); Image.new("RGB", (8, 8), "blue").save(buf, "PNG")
        >>> path = os.path.join(tempfile.mkdtemp(), "pairs.tar")
        >>> with tarfile.open(path, "w") as tar:
        ...     for name, data in [("0.png", buf.getvalue()), ("0.txt", b"A Blue Square"),
        ...                        ("1.png", b"not an image"), ("1.txt", b"broken")]:
        ...         info = tarfile.TarInfo(name); info.size = len(data)
        ...         tar.addfile(info, io.BytesIO(data))
        >>> stats = ReadStats()
        >>> docs = PairReader(image_size=4, caption_first_prob=1.0).read(path, stats=stats)
        >>> docs[0].items[0], tuple(docs[0].items[1].shape), docs[0].caption_first
        ('a blue square', (3, 4, 4), True)
        >>> dict(stats)
        {'records': 2, 'images': 1, 'documents': 1, 'unreadable_image': 1}
    """

    def __init__(self, *, caption_first_prob: float = 0.5, train_caption_first: bool = False,
                 lowercase: bool = True, image_size: int | None = 224, seed: int = 0) -> None:
        if isinstance(caption_first_prob, bool) or not isinstance(caption_first_prob, (int, float)) \
                or not 0 <= caption_first_prob <= 1:
            raise ValueError(f"caption_first_prob must be a probability in [0, 1], got "
                             f"{caption_first_prob!r}")
        self.caption_first_prob = float(caption_first_prob)
        self.train_caption_first, self.lowercase = bool(train_caption_first), bool(lowercase)
        self.image_size, self.seed = image_size, seed

    def read(self, path: str | os.PathLike, *, stats: ReadStats | None = None) -> list[Document]:
        """All documents of one shard, in order."""
        return [doc for _, doc in self(path, stats=stats)]

    def __call__(self, path: str | os.PathLike, *, start: int = 0,
                 select: Callable[[int], bool] | None = None, seed: Any = None,
                 stats: ReadStats | None = None) -> Iterator[tuple[int, Document]]:
        stats = stats if stats is not None else ReadStats()
        seed = self.seed if seed is None else seed
        name = os.path.basename(os.fspath(path))
        for i, key, sample in tar_samples(path, start=start, select=select, stats=stats):
            stats["records"] += 1
            doc = self._document(sample, random.Random(f"pairs:{seed}:{name}:{i}"), stats)
            if doc is not None:
                doc.meta["source"] = f"{name}:{key}"
                stats["documents"] += 1
                yield i, doc

    def _caption(self, sample: dict[str, bytes]) -> str | None:
        try:
            if "txt" in sample:
                text = sample["txt"].decode("utf-8")
            elif "json" in sample:
                text = json.loads(sample["json"]).get("caption")
            else:
                return None
        except (ValueError, AttributeError):
            return None
        if not isinstance(text, str) or not text.strip():
            return None
        text = " ".join(text.split())
        return text.lower() if self.lowercase else text

    def _document(self, sample: dict[str, bytes], rng: random.Random,
                  stats: ReadStats) -> Document | None:
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            stats["missing_image"] += 1
            return None
        caption = self._caption(sample)
        if caption is None:
            stats["missing_caption"] += 1
            return None
        try:
            image = load_image(io.BytesIO(sample[ext]), self.image_size)
        except Exception as e:  # noqa: BLE001 - any decoding failure is counted, not fatal
            stats["unreadable_image"] += 1
            logger.debug("unreadable image in sample: %s", e)
            return None
        stats["images"] += 1
        if rng.random() < self.caption_first_prob:
            return Document([caption, image], caption_first=not self.train_caption_first)
        return Document([image, caption])
