"""Timing and memory helpers shared by the benchmark suites (recipes only)."""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["measure", "format_table", "peak_memory"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak bytes allocated while ``fn`` runs (CUDA allocator, or the CPU allocator via
    the profiler's memory accounting)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return float(torch.cuda.max_memory_allocated() - base)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    # Walk allocation events in order to find the high-water mark above the start.
    current = peak = 0
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0),
                    key=lambda e: e.time_range.start)
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return float(peak)


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


def format_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-markdown table."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1000 else f"{c:.0f}"
    return str(c)


# Kept for suites that want the process-level high-water mark (coarse, never resets).
def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

