"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` runs after one warm-up (the least noisy estimate on a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """``fn`` as a run for :func:`best_times`: it returns the seconds ``fn()`` took on ``clock``."""

    def run() -> float:
        start = clock()
        fn()
        return clock() - start

    return run


def best_times(runs: Sequence[Callable[[], float]], repeats: int) -> list[float]:
    """Fastest of ``repeats`` runs of each, after one warm-up each, alternating between them.

    Each run returns the seconds it measured (:func:`timed` wraps a plain callable; a run with untimed set-up,
    such as decode steps after a prefill, times its own span). Alternating makes load changes on a shared machine
    hit every run alike, so the ratios stay meaningful when the absolute times do not.
    """
    for run in runs:
        run()
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, run_times in zip(runs, times):
            run_times.append(run())
    return [min(run_times) for run_times in times]
