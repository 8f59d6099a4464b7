"""Progress of long work: a live bar on a terminal, plain lines in a log.

A redrawn bar (tqdm) is right for a person watching a terminal, and wrong in a file: a default run redirected
to a log was ~1 500 lines of carriage-return redraws. So when stderr is not a terminal, progress is a plain
log line every ``LINE_SECONDS`` instead; either way, a finished piece of work logs one summary line (what,
how many, how long, the last figures shown), so the run's log (``logs/pipeline.log``) reads as a narrative.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

from lvaa_jax.distributed import is_primary

log = logging.getLogger(__name__)
LINE_SECONDS = 10.0  # between two progress lines when stderr is not a terminal


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _figures(postfix: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in postfix.items())


class _Progress:
    """What both forms share: counting, the figures shown beside the count, and the summary line."""

    def _start(self, desc: str, unit: str, total: int | None, initial: int) -> None:
        self.desc, self.unit, self.total = desc, unit, total
        self.started, self.initial = time.monotonic(), initial
        self.figures: dict[str, Any] = {}
        self.summarised = False

    def _rate(self, done: int) -> float:
        elapsed = time.monotonic() - self.started
        return (done - self.initial) / elapsed if elapsed > 0 else 0.0

    def _summarise(self, done: int) -> None:
        if self.summarised:
            return
        self.summarised = True
        elapsed = time.monotonic() - self.started
        of = f"/{self.total}" if self.total is not None and done != self.total else ""
        rate = f" ({self._rate(done):.3g} {self.unit}/s)" if done > self.initial and elapsed > 0 else ""
        figures = f"; {_figures(self.figures)}" if self.figures else ""
        log.info("%s: %d%s %s in %s%s%s", self.desc, done, of, self.unit, _duration(elapsed), rate, figures)


class _Bar(_Progress, tqdm):
    """tqdm on a terminal, plus the summary line when it closes."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str, initial: int,
                 leave: bool):
        tqdm.__init__(self, iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)
        self._start(desc, unit, self.total, initial)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values: Any) -> None:
        self.figures = dict(ordered_dict or {}, **values)
        tqdm.set_postfix(self, ordered_dict, refresh, **values)

    def close(self) -> None:
        if not self.disable:
            self._summarise(self.n)
        tqdm.close(self)


class _Lines(_Progress):
    """A plain log line every ``LINE_SECONDS`` (count, rate, time left, figures), and the summary at the end."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str, initial: int):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.n, self.last_line = iterable, initial, time.monotonic()
        self._start(desc, unit, total, initial)

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_line >= LINE_SECONDS:
            self.last_line = time.monotonic()
            rate = self._rate(self.n)
            line = f"{self.desc}: {self.n}"
            if self.total:
                left = (self.total - self.n) / rate if rate > 0 else math.inf
                line += f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), ~{_duration(left)} left"
            else:
                line += f" {self.unit}"
            line += f", {rate:.3g} {self.unit}/s"
            log.info("%s%s", line, f"; {_figures(self.figures)}" if self.figures else "")

    def set_postfix(self, **values: Any) -> None:
        self.figures = values

    def close(self) -> None:
        self._summarise(self.n)

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _Off:
    """``disable=True``: the same calls, no output."""

    def __init__(self, iterable: Iterable | None):
        self.iterable, self.n = iterable, 0

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *_: object) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, leave: bool = True, disable: bool = False) -> Any:
    """Progress over ``iterable`` (iterate it) or up to ``total`` (call ``update``), as a context manager:
    a tqdm bar when stderr is a terminal (``leave=False``: the bar goes when done), plain log lines
    otherwise; both log one summary line at the end. ``set_postfix(loss=...)`` adds figures to both.
    In a job of several processes, process 0 alone shows progress."""
    if disable or not is_primary():
        return _Off(iterable)
    if sys.stderr.isatty():
        return _Bar(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    return _Lines(iterable, total=total, desc=desc, unit=unit, initial=initial)
