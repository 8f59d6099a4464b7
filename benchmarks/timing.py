"""Timing shared by the benchmarks."""

import time
from collections.abc import Callable


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs: other work on the machine only ever slows a run down."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
