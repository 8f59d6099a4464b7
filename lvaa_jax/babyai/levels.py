"""BabyAI levels: validation, quiet env construction, and the seed scheme shared by every stage."""

from __future__ import annotations

import contextlib
import difflib
import io
import warnings
from collections.abc import Iterator, Sequence

import gymnasium as gym
import minigrid  # noqa: F401  (importing registers the BabyAI-* ids)

from lvaa_jax.errors import LvaaError

# Seeds of the three uses are drawn from disjoint ranges, so that evaluation never replays a training
# episode and the mission census never depends on how many demos were asked for.
SEED_SPLITS = {"train": 0, "eval": 1 << 30, "census": 2 << 30}
_SEED_RANGE = 1 << 30
_BASE_STRIDE = 1_000_003  # a prime, so that config seeds 0, 1, 2 ... start far apart in each range


def episode_seed(base_seed: int, split: str, index: int) -> int:
    """The env seed of episode ``index`` of ``split`` for a config seed: deterministic, disjoint per split."""
    return SEED_SPLITS[split] + (base_seed * _BASE_STRIDE + index) % _SEED_RANGE


def known_levels() -> list[str]:
    return sorted(env_id for env_id in gym.registry if env_id.startswith("BabyAI-"))


def check_levels(levels: Sequence[str]) -> list[str]:
    """The levels as a list, or a one-line error naming an unknown id and the closest known ones."""
    levels = list(levels)
    if not levels:
        raise LvaaError("config.data.levels is empty: name at least one BabyAI level, e.g. BabyAI-GoToLocal-v0")
    known = set(known_levels())
    for level in levels:
        if level not in known:
            close = difflib.get_close_matches(level, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see lvaa_jax.babyai.known_levels()"
            raise LvaaError(f"config.data.levels: unknown BabyAI level {level!r}{hint}")
    if len(set(levels)) != len(levels):
        raise LvaaError(f"config.data.levels: a level is listed twice in {levels}")
    return levels


def make_env(level: str) -> gym.Env:
    """A BabyAI env without gymnasium's checker wrappers (they only slow stepping)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gym.make(level, disable_env_checker=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silences minigrid's ``Sampling rejected: ...`` prints during level generation."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
