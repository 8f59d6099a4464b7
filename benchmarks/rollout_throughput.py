"""Expert-demo throughput: make_demos with 1 and 2 worker processes against a plain single-process loop.

    python -m benchmarks.rollout_throughput --episodes_per_level=250

The reference is what one would write without this package: one gymnasium env per level, BabyAIBot,
no census, no writing. make_demos does more (mission census, sharding, .npy writing, sha256), so a
ratio above 1 with two workers is parallelism paying for all of that.
"""

import tempfile
import time

from absl import app, flags

from configs.default import DEFAULT_LEVELS, get_config
from lvaa_jax.babyai import episode_seed, make_demos, make_env
from lvaa_jax.babyai.rollout import expert_episode

EPISODES = flags.DEFINE_integer("episodes_per_level", 250, "Episodes per default level in each measurement.")
WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker-process counts to measure.")


def plain_loop(episodes: int) -> tuple[float, int, int]:
    start, count, steps = time.perf_counter(), 0, 0
    for level in DEFAULT_LEVELS:
        env = make_env(level)
        for i in range(episodes):
            episode = expert_episode(env, level, episode_seed(0, "train", i))
            if episode is not None:
                count, steps = count + 1, steps + len(episode.action)
    return time.perf_counter() - start, count, steps


def with_make_demos(episodes: int, workers: int) -> tuple[float, int, int]:
    config = get_config()
    config.data.episodes_per_level = episodes
    config.data.episodes_per_shard = max(1, episodes // 2)
    config.data.num_workers = workers
    config.data.census_resets = 0
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        dataset = make_demos(config, workdir, progress=False)
        seconds = time.perf_counter() - start
        return seconds, dataset.num_episodes, int(dataset.length.sum())


def main(_):
    rows = [("plain loop (reference)", *plain_loop(EPISODES.value))]
    for workers in map(int, WORKERS.value):
        rows.append((f"make_demos, {workers} worker{'s' * (workers > 1)}", *with_make_demos(EPISODES.value, workers)))
    reference = rows[0][3] / rows[0][1]
    print(f"{'':28s} {'episodes':>8s} {'steps':>7s} {'seconds':>8s} {'episodes/s':>10s} {'steps/s':>8s} {'vs ref':>6s}")
    for name, seconds, episodes, steps in rows:
        print(f"{name:28s} {episodes:8d} {steps:7d} {seconds:8.1f} {episodes / seconds:10.1f} {steps / seconds:8.0f} "
              f"{steps / seconds / reference:5.2f}x")


if __name__ == "__main__":
    app.run(main)
