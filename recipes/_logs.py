"""The run's logs for ``recipes/train.py``: ``metrics.jsonl`` and the progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["open_metrics", "progress"]


def open_metrics(path: Path, step: int, resume: bool):
    """``metrics.jsonl`` for this run: a new run starts an empty file; a resumed one keeps
    the records up to the checkpoint's step (later ones came from the interrupted run)."""
    kept = []
    if resume and path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
    f = open(path, "w")
    f.writelines(line + "\n" for line in kept)
    f.flush()
    return f


def progress(acc, step: int, stop: int):
    """A tqdm bar (rate, ETA) on an interactive terminal; ``None`` elsewhere (log lines)."""
    if not acc.is_main_process or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=stop, initial=step, desc="train", unit="step", dynamic_ncols=True)
