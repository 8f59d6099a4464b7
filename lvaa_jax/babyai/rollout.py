"""Expert rollouts with minigrid's BabyAIBot; these functions run inside worker processes."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np
from minigrid.utils.baby_ai_bot import BabyAIBot

from lvaa_jax.babyai.levels import episode_seed, make_env, quiet


@dataclasses.dataclass
class Episode:
    """One successful expert episode: the observation before each action, and the action."""

    level: str
    seed: int
    mission: str
    image: np.ndarray  # uint8 [steps, 7, 7, 3]
    direction: np.ndarray  # uint8 [steps]
    action: np.ndarray  # uint8 [steps]


def expert_episode(env, level: str, seed: int) -> Episode | None:
    """Rolls out the bot on one seed; None if the bot fails, raises, or runs out of steps."""
    with quiet():
        obs, _ = env.reset(seed=seed)
    bot = BabyAIBot(env.unwrapped)
    images, directions, actions = [], [], []
    while True:
        try:
            action = int(bot.replan())
        except Exception:  # noqa: BLE001 - the bot gives up on some layouts; counted as a failure
            return None
        images.append(obs["image"])
        directions.append(obs["direction"])
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        if terminated:
            if reward <= 0:
                return None
            return Episode(
                level, seed, obs["mission"], np.stack(images).astype(np.uint8),
                np.asarray(directions, np.uint8), np.asarray(actions, np.uint8),
            )
        if truncated:
            return None


def roll_episodes(
    levels: Sequence[str], jobs: Sequence[tuple[int, int]], base_seed: int
) -> tuple[list[Episode], Counter]:
    """Expert episodes for ``jobs`` of (level index, episode index); failures counted per level."""
    envs: dict[int, object] = {}
    episodes, failures = [], Counter()
    for level_index, episode_index in jobs:
        if level_index not in envs:
            envs[level_index] = make_env(levels[level_index])
        level = levels[level_index]
        episode = expert_episode(envs[level_index], level, episode_seed(base_seed, "train", episode_index))
        if episode is None:
            failures[level] += 1
        else:
            episodes.append(episode)
    return episodes, failures


def level_missions(level: str, base_seed: int, train_episodes: int, census_resets: int) -> list[str]:
    """Every mission seen on the training seeds and on ``census_resets`` extra seeds of a level.

    Including the training seeds makes the list closed: every demo's mission is in it.
    """
    env = make_env(level)
    seeds = [episode_seed(base_seed, "train", i) for i in range(train_episodes)]
    seeds += [episode_seed(base_seed, "census", i) for i in range(census_resets)]
    missions = set()
    with quiet():
        for seed in seeds:
            obs, _ = env.reset(seed=seed)
            missions.add(obs["mission"])
    return sorted(missions)
