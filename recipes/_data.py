"""Training data for ``recipes/train.py``: the shapes corpus or streamed web data.

``data.source: shapes`` (the demo): documents are generated on the fly by index; each
process reads its own consecutive slice of the global micro-batch (the data position is
the number of samples consumed, so a run resumes in any number of processes).

``data.source: webdata`` (the paper's mix): MMC4 JSONL shards and image-text tar shards,
mixed with fixed weights, tokenised and packed into ``data.max_length``-token rows by
:class:`~mmlayers.data.InterleavedStream`; each process reads its own slots (rank ×
dataloader worker) of the shards. Its position is saved per process and restored on
resume with the same number of processes and workers.
"""

from __future__ import annotations

import glob
from typing import Any

__all__ = ["ShapesData", "WebData", "build_data"]


class ShapesData:
    """Index-addressed shapes documents (``batch(first, n)`` = documents first … first+n−1)."""

    def __init__(self, corpus, collate) -> None:
        self.corpus, self.collate = corpus, collate

    def batch(self, first: int, n: int):
        return self.collate([self.corpus[i] for i in range(first, first + n)])

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass


class WebData:
    """The next packed batch of this process's stream (the index arguments are ignored)."""

    def __init__(self, loader) -> None:
        self.loader, self._it = loader, None

    def batch(self, first: int, n: int):
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            raise RuntimeError("the training data ran out; raise data.epochs or use null "
                               "(stream forever)") from None

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def _shards(spec: dict) -> list[str]:
    pattern = spec.get("shards")
    found = sorted(glob.glob(str(pattern))) if pattern else []
    if not found:
        raise ValueError(f"data.datasets[{spec.get('name')!r}].shards={pattern!r} matches no file")
    return found


def _web_source(d: dict, image_size: int):
    from mmlayers.data import Mixture, MMC4Reader, PairReader, ShardedSource

    sources, weights = [], []
    for spec in d["datasets"]:
        kind = spec.get("kind")
        if kind == "mmc4":
            reader = MMC4Reader(spec["images"], sim_threshold=spec.get("sim_threshold", 0.24),
                                max_images=spec.get("max_images", 6),
                                single_image_keep=spec.get("single_image_keep", 0.5),
                                image_first_prob=spec.get("image_first_prob", 0.5),
                                image_size=image_size, seed=d["seed"])
        elif kind == "pairs":
            reader = PairReader(caption_first_prob=spec.get("caption_first_prob", 0.5),
                                train_caption_first=spec.get("train_caption_first", False),
                                image_size=image_size, seed=d["seed"])
        else:
            raise ValueError(f"data.datasets[{spec.get('name')!r}].kind must be 'mmc4' or "
                             f"'pairs', got {kind!r}")
        sources.append(ShardedSource(_shards(spec), reader, name=spec["name"], seed=d["seed"],
                                     epochs=d.get("epochs")))
        weights.append(spec.get("weight", 1.0))
    return Mixture(sources, weights, seed=d["seed"], stopping=d.get("stopping", "all_exhausted"))


def build_data(cfg: dict, tokenizer, collate, *, micro_batch: int, rank: int, world: int):
    """(training data, held-out shapes corpus or ``None``) for ``cfg["data"]``."""
    from mmlayers.data import InterleavedStream, ShapesCorpus, StreamingLoader

    d = cfg["data"]
    source = d.get("source", "shapes")
    if source == "shapes":
        kw = dict(size=d["image_size"], kinds=d["kinds"], colors=d["colors"],
                  max_shapes=d["max_shapes"], jitter=d["jitter"],
                  caption_first=d["caption_first"], tensors=True)
        corpus = ShapesCorpus(seed=d["seed"], length=10**9, **kw)
        held_out = ShapesCorpus(seed=d["eval_seed"], length=10**6, **kw)
        return ShapesData(corpus, collate), held_out
    if source != "webdata":
        raise ValueError(f"data.source must be 'shapes' or 'webdata', got {source!r}")
    stream = InterleavedStream(_web_source(d, d["image_size"]), collate, batch_size=micro_batch,
                               max_images=d.get("max_images"), rank=rank, world_size=world,
                               drop_last=True)
    loader = StreamingLoader(stream, num_workers=d.get("num_workers", 0),
                             persistent_workers=False)
    return WebData(loader), None
