"""Data loader throughput on generated shards, and whether it keeps a training step fed.

Writes ``--shards`` MMC4-style JSONL shards (with a folder of PNG images) and as many
webdataset-style tar shards of JPEG image-caption pairs into a temporary folder, then
streams them through the real pipeline (:class:`~mmlayers.data.MMC4Reader` /
:class:`~mmlayers.data.PairReader` → :class:`~mmlayers.data.Mixture` (pairs : MMC4 = 3 : 2,
the paper's three LAION sets to one MMC4 at weight 2) → token packing → collation) with a
``DataLoader`` of ``--workers`` processes, and reports documents/s, images/s and rows/s
(wall time, one pass over the data). Then it trains the tiny MM-Interleaved
(``MMInterleavedConfig.tiny``) on the stream for ``--steps`` steps and reports how long the
loop waited for each batch against the step time: a ratio well below 1 means the loader
keeps the step fed.

    python recipes/benchmark.py data [--quick] [--workers 2] [--docs 64] [--shards 4]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import tarfile
import tempfile
import time
from datetime import date

import torch

from bench._common import format_table

WORDS = ("red green blue circle square triangle left right top bottom small large the a "
         "on in of and now same shape moves to is").split()


def _image(rng: random.Random, size: int, fmt: str) -> bytes:
    from PIL import Image

    raw = bytes(rng.getrandbits(8) for _ in range(3 * 8 * 8))
    img = Image.frombytes("RGB", (8, 8), raw).resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "."


def write_shards(root: str, *, shards: int, docs: int, image_px: int, seed: int = 0):
    """MMC4 JSONL + image folder and tar pair shards; returns (mmc4 paths, tar paths, root)."""
    rng = random.Random(seed)
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    mmc4, pairs = [], []
    for s in range(shards):
        path = os.path.join(root, f"docs_{s}.jsonl")
        with open(path, "w") as f:
            for d in range(docs):
                texts = [_sentence(rng) for _ in range(rng.randint(4, 10))]
                info = []
                for i in range(rng.randint(2, 6)):
                    name = f"{s}_{d}_{i}.png"
                    with open(os.path.join(images, name), "wb") as g:
                        g.write(_image(rng, image_px, "PNG"))
                    info.append({"image_name": name, "matched_text_index": rng.randrange(len(texts)),
                                 "matched_sim": rng.uniform(0.2, 0.4)})
                f.write(json.dumps({"text_list": texts, "image_info": info}) + "\n")
        mmc4.append(path)
        path = os.path.join(root, f"pairs_{s}.tar")
        with tarfile.open(path, "w") as tar:
            for d in range(docs):
                for ext, data in (("jpg", _image(rng, image_px, "JPEG")),
                                  ("txt", _sentence(rng).encode())):
                    member = tarfile.TarInfo(f"{d:06d}.{ext}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
        pairs.append(path)
    return mmc4, pairs, images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4, help="shards per dataset")
    parser.add_argument("--docs", type=int, default=64, help="documents per shard")
    parser.add_argument("--image-px", type=int, default=256, help="stored image side")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--batch", type=int, default=4, help="packed rows per batch")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row")
    parser.add_argument("--max-images", type=int, default=8, help="images per row")
    parser.add_argument("--steps", type=int, default=20, help="training steps to time")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--quick", action="store_true",
                        help="2 shards of 6 docs, 64 px, rows of 128 tokens, 2 rows, 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.shards, args.docs, args.image_px, args.steps = 2, 6, 64, 2
        args.max_length, args.max_images, args.batch = 128, 4, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from mmlayers.data import (
        InterleavedCollator,
        InterleavedStream,
        Mixture,
        MMC4Reader,
        PairReader,
        ShardedSource,
        StreamingLoader,
        word_level_tokenizer,
    )
    from mmlayers.models import MMInterleaved, MMInterleavedConfig

    torch.manual_seed(0)
    tok = word_level_tokenizer(WORDS + ["."])
    cfg = MMInterleavedConfig.tiny(vocab_size=len(tok))
    size, k = cfg.vision.config["image_size"], cfg.vision.num_tokens
    collate = InterleavedCollator(tokenizer=tok, num_image_tokens=k, max_length=args.max_length,
                                  pad_to_max_length=True)

    with tempfile.TemporaryDirectory() as root:
        mmc4, pairs, images = write_shards(root, shards=args.shards, docs=args.docs,
                                           image_px=args.image_px)

        def stream(epochs: int | None) -> InterleavedStream:
            mix = Mixture([ShardedSource(pairs, PairReader(image_size=size), name="pairs",
                                         epochs=epochs),
                           ShardedSource(mmc4, MMC4Reader(images, image_size=size), name="mmc4",
                                         epochs=epochs)],
                          [3, 2], seed=0, stopping="first_exhausted")
            return InterleavedStream(mix, collate, batch_size=args.batch,
                                     max_images=args.max_images)

        rows = []
        for workers in sorted({0, args.workers}):
            loader = StreamingLoader(stream(1), num_workers=workers)
            t0 = time.perf_counter()
            batches = n_rows = n_images = 0
            for b in loader:
                batches, n_rows = batches + 1, n_rows + b.input_ids.shape[0]
                n_images += b.images.shape[0]
            wall = time.perf_counter() - t0
            docs = sum(s["documents"] for s in loader.stats().values())
            rows.append([f"loader, {workers} worker(s)", docs, n_images, docs / wall,
                         n_images / wall, n_rows / wall, 1e3 * wall / max(batches, 1)])
        print(f"data suite, {date.today()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}, wall time; rows of "
              f"{args.max_length} tokens, ≤ {args.max_images} images, {args.batch} rows/batch, "
              f"{size}px images from {args.image_px}px files")
        print(format_table(["loader", "documents", "images packed", "documents/s", "images/s",
                            "rows/s", "ms per batch"], rows))
        per_batch = rows[-1][-1] / 1e3

        model = MMInterleaved.from_config(cfg, tokenizer=tok)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loader = StreamingLoader(stream(None), num_workers=args.workers)
        waits, steps = [], []
        it = iter(loader)
        next(it)  # worker start-up is not a steady-state cost
        for step in range(args.steps):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            out = model(batch, generator=torch.Generator().manual_seed(step))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            waits.append(t1 - t0)
            steps.append(time.perf_counter() - t1)
        del it
        wait, step = statistics.mean(waits), statistics.mean(steps)
        print(format_table(
            ["training loop", "steps", "step s", "wait for batch s", "wait / step",
             "loader alone s/batch", "loader alone / step"],
            [[f"tiny model, {args.workers} worker(s)", args.steps, step, wait, wait / step,
              per_batch, per_batch / step]]))


if __name__ == "__main__":
    main()
