"""Timing and memory helpers shared by the benchmark suites (recipes only).

``set_json_output(path)`` (``recipes/benchmark.py --json PATH``) makes every
``format_table`` call also record its table, with the command, date and machine, in a
JSON file that ``recipes/plot_benchmarks.py`` reads.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

__all__ = ["measure", "format_table", "peak_memory", "set_json_output", "machine_description"]

_json: dict | None = None  # {"path": str, "record": {...}} while JSON output is on


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before.

    CUDA: the caching allocator's peak. CPU: the process's resident-set high-water mark
    (VmHWM, reset through /proc/self/clear_refs) minus the resident set before the call.
    ``recipes/benchmark.py`` starts with ``MALLOC_MMAP_THRESHOLD_`` fixed so that glibc
    returns large freed blocks to the OS at once and the resident set follows the live
    tensors.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return float(torch.cuda.max_memory_allocated() - base)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    fn()
    return float(max(0, _status_kb("VmHWM") - base) * 1024)


def measure(fn: Callable[[], object], *, device: str = "cpu", repeats: int = 3,
            warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_description() -> str:
    """CPU model and core count, OS, torch version and, when present, the CUDA device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores", f"{platform.system()} {platform.machine()}",
             f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    return "; ".join(parts)


def set_json_output(path: str | os.PathLike | None, *, suite: str = "",
                    command: str | None = None) -> None:
    """Record every later ``format_table`` table in ``path`` (``None``: stop recording).

    The file holds ``{"suite", "command", "date", "machine", "tables": [{"header",
    "rows"}]}`` and is rewritten after each table, so an interrupted run keeps what it
    measured.
    """
    global _json
    if path is None:
        _json = None
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    _json = {"path": os.fspath(path), "record": {
        "suite": suite,
        "command": command if command is not None else "python " + " ".join(sys.argv),
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "tables": []}}


def _record_table(header: list[str], rows: list[list[object]]) -> None:
    def plain(c: object) -> object:
        return c if isinstance(c, (int, float, str)) or c is None else str(c)

    _json["record"]["tables"].append({"header": [str(h) for h in header],
                                      "rows": [[plain(c) for c in r] for r in rows]})
    with open(_json["path"], "w") as f:
        json.dump(_json["record"], f, indent=1, ensure_ascii=False)


def format_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-markdown table (also recorded as JSON after ``set_json_output``)."""
    if _json is not None:
        _record_table(header, rows)
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1000 else f"{c:.0f}"
    return str(c)

