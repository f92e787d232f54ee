"""``python recipes/benchmark.py data --quick`` runs and reports real numbers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))

from bench import data as bench_data  # noqa: E402


def _rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith(f"| {first_cell}")]


def test_data_suite_quick(capsys):
    bench_data.main(["--quick"])
    out = capsys.readouterr().out
    loaders = _rows(out, "loader,")
    assert [r[0] for r in loaders] == ["loader, 0 worker(s)", "loader, 2 worker(s)"]
    for r in loaders:
        docs, images = int(r[1]), int(r[2])
        assert 0 < docs <= 24 and images >= docs  # every MMC4 document has ≥ 1 image
        assert all(float(x) > 0 for x in r[3:])
    (train,) = _rows(out, "tiny model")
    assert train[1] == "2" and all(float(x) > 0 for x in train[2:])
    assert re.search(r"rows of 128 tokens, ≤ 4 images, 2 rows/batch", out)
