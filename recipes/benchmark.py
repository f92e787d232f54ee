"""Benchmarks: ``python recipes/benchmark.py SUITE [options]``.

Each suite lives in ``recipes/bench/<suite>.py`` and prints one table of times, peak
memory and ratios against the reference measured in the same run (absolute times drift
on a shared machine; ratios are what we compare). ``python recipes/benchmark.py --help``
lists the suites.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> None:
    import bench

    suites = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=suites, help="which benchmark to run")
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(f"bench.{args.suite}")
    module.main(rest)


if __name__ == "__main__":
    main()
