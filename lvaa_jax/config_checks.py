"""Bounds of numeric settings, checked by the module that reads each config section, before any work.

Every section reads the same way: ``check_section(config, "train", steps=POSITIVE_INT, ...)`` refuses
``--config.train.steps=-5`` with ``config.train.steps=-5: must be a positive integer``. A value that
slipped through would not fail later: a negative step count trains nothing and exits 0, a negative
learning rate runs gradient ascent.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from lvaa_jax.errors import LvaaError


@dataclasses.dataclass(frozen=True)
class Bound:
    """What a setting must be, in words, and the test of it."""

    description: str
    accepts: Callable[[Any], bool]


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


POSITIVE_INT = Bound("a positive integer", lambda v: _integer(v) and v >= 1)
NON_NEGATIVE_INT = Bound("an integer >= 0", lambda v: _integer(v) and v >= 0)
POSITIVE = Bound("a finite number > 0", lambda v: _finite(v) and v > 0)
NON_NEGATIVE = Bound("a finite number >= 0", lambda v: _finite(v) and v >= 0)
FRACTION = Bound("a number in [0, 1)", lambda v: _finite(v) and 0 <= v < 1)
BOOLEAN = Bound("True or False", lambda v: isinstance(v, bool))


def check_section(config: ml_collections.ConfigDict, section: str, **bounds: Bound) -> None:
    """Refuses the first setting of ``config.<section>`` (``""``: the top level) outside its bound."""
    check_values(config[section] if section else config, f"config.{section}." if section else "config.", **bounds)


def check_values(values: Mapping[str, Any], prefix: str, **bounds: Bound) -> None:
    """``check_section`` for a section handed over on its own (a stage given ``config.align``), named by
    ``prefix`` (``"config.align."``) in the error."""
    for key, bound in bounds.items():
        value = values.get(key)
        if not bound.accepts(value):
            raise LvaaError(f"{prefix}{key}={value!r}: must be {bound.description}")
