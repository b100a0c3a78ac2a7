"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time


def _wall_times(fn, repeats: int) -> list[float]:
    """Wall times of `repeats` calls of `fn()` after one untimed warm-up call (which absorbs
    compilation). `fn` must block until its work is done."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls (after a warm-up call)."""
    return statistics.median(_wall_times(fn, repeats))


def best_seconds(fn, repeats: int) -> float:
    """Fastest wall time of `fn()` over `repeats` calls after a warm-up call: for a ceiling,
    where the best case is the point (a busy moment on a shared machine only slows a run)."""
    return min(_wall_times(fn, repeats))
