"""Timing shared by the benchmarks."""

import time
from collections.abc import Callable


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs: other work on the machine only ever slows a run down."""
    return interleaved_best_seconds({"run": run}, repeats)["run"]


def interleaved_best_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` runs of each, in alternating rounds, so that a slow spell on a shared
    machine hits every contender instead of whichever was timed during it."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}
