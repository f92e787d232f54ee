"""Benchmarks: ``python recipes/benchmark.py SUITE [options]``.

Each suite lives in ``recipes/bench/<suite>.py`` and prints one table of times, peak
memory and ratios against the reference measured in the same run (absolute times drift
on a shared machine; ratios are what we compare). ``python recipes/benchmark.py --help``
lists the suites; ``python recipes/benchmark.py SUITE --help`` shows a suite's options.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _suite_list(suites: list[str]) -> str:
    """Each suite with the first line of its docstring (read without importing it)."""
    lines = ["suites (python recipes/benchmark.py SUITE --help shows a suite's options;",
             "--json PATH works with every suite):"]
    for name in suites:
        source = (Path(__file__).resolve().parent / "bench" / f"{name}.py").read_text()
        doc = (ast.get_docstring(ast.parse(source)) or "").strip().splitlines()
        lines.append(f"  {name:<11} {doc[0].replace('``', '') if doc else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if argv is None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # A fixed mmap threshold makes glibc hand large freed blocks straight back to the
        # OS, so the resident set that bench._common.peak_memory reads follows live tensors.
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    import bench

    suites = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))
    parser = argparse.ArgumentParser(description=__doc__, add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=_suite_list(suites))
    parser.add_argument("-h", "--help", action="store_true",
                        help="show this help, or with a suite that suite's options")
    parser.add_argument("suite", nargs="?", choices=suites, help="which benchmark to run")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also save the tables, command, date and machine as JSON "
                             "(read by recipes/plot_benchmarks.py)")
    args, rest = parser.parse_known_args(argv)
    if args.suite is None:
        if args.help:
            parser.print_help()
            return
        parser.error("choose a suite (see --help)")
    if args.help:  # the suite's own parser prints its flags and exits
        rest = [*rest, "--help"]
    elif args.json:
        from bench._common import set_json_output

        set_json_output(args.json, suite=args.suite,
                        command=" ".join(["python recipes/benchmark.py", args.suite, *rest]))
    module = importlib.import_module(f"bench.{args.suite}")
    module.main(rest)


if __name__ == "__main__":
    main()
