"""Closed-loop evaluation: the agent acts greedily in fresh seeds of each level, many envs at once."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lvaa_jax.agent.model import Agent, instruction_embedding
from lvaa_jax.babyai import Tokenizer, episode_seed, make_env
from lvaa_jax.babyai.levels import quiet
from lvaa_jax.files import append_csv, drop_rows_after, write_json
from lvaa_jax.progress import progress_bar


def _bucket(n: int) -> int:
    """Batch sizes are rounded up to powers of two so that a shrinking set of live envs compiles rarely."""
    return max(8, 1 << (n - 1).bit_length())


def evaluate(
    model: Agent, params, tokenizer: Tokenizer, levels: Sequence[str], episodes_per_level: int, seed: int,
    max_steps: int = 0, progress: bool = True,
) -> dict:
    """Success rate, mean return and mean episode length per level on evaluation seeds (never trained on).

    The agent's memory is the current window of ``model.context`` steps and restarts at each window
    boundary, exactly as the training windows cut episodes. Instruction vectors are computed once per
    episode and each observation is encoded once, when it arrives. ``max_steps`` > 0 caps episodes below
    the level's own limit.
    """
    jobs = [(level, i) for level in levels for i in range(episodes_per_level)]
    envs, observations = [], []
    with quiet():
        for level, i in jobs:
            envs.append(make_env(level))
            observations.append(envs[-1].reset(seed=episode_seed(seed, "eval", i))[0])
    n, t = len(jobs), model.context
    tokens, token_mask = tokenizer.encode_batch([o["mission"] for o in observations], model.max_instruction_length)
    z = instruction_embedding(params, tokens, token_mask, model=model)
    memory = jnp.zeros((n, t, model.width), model.dtype)  # step vectors of the current window
    slot = np.zeros(n, np.int64)  # position of the current step within its window
    steps, reward, done = np.zeros(n, np.int64), np.zeros(n), np.zeros(n, bool)
    limit = np.asarray([env.unwrapped.max_steps for env in envs])
    if max_steps > 0:
        limit = np.minimum(limit, max_steps)
    with progress_bar(total=n, desc="evaluate", unit="ep", disable=not progress) as bar:
        while not done.all():
            live = np.flatnonzero(~done)
            rows = np.concatenate([live, np.full(_bucket(len(live)) - len(live), live[0])])
            image = np.stack([observations[i]["image"] for i in rows])
            direction = np.asarray([observations[i]["direction"] for i in rows], np.int32)
            memory, actions = _observe_and_act(model, params, memory, z, rows, slot[rows], image, direction)
            actions = np.asarray(actions)[: len(live)]
            with quiet():
                for i, action in zip(live, actions, strict=True):
                    observations[i], r, terminated, truncated, _ = envs[i].step(int(action))
                    steps[i] += 1
                    if terminated or truncated or steps[i] >= limit[i]:
                        done[i], reward[i] = True, r if terminated else 0.0
                        bar.update()
            slot[live] = (slot[live] + 1) % t  # a full window starts over: memory resets
    results = {}
    for level in levels:
        rows = np.asarray([j for j, (lvl, _) in enumerate(jobs) if lvl == level])
        results[level] = {
            "episodes": len(rows),
            "success_rate": float((reward[rows] > 0).mean()),
            "mean_return": float(reward[rows].mean()),
            "mean_length": float(steps[rows].mean()),
        }
    return {"levels": results, "mean_success_rate": float(np.mean([r["success_rate"] for r in results.values()]))}


@functools.partial(jax.jit, static_argnums=0)
def _observe_and_act(model: Agent, params, memory, z, rows, slot, image, direction):
    """Writes the new step vector of each row into its window slot and returns the greedy action there.

    Slot 0 starts a new window, so the row's older steps are cleared first.
    """
    zr = z[rows][:, None]  # one instruction vector for every step of the row's window
    step = model.apply({"params": params}, image[:, None], direction[:, None], zr, method=Agent.observe)[:, 0]
    window = jnp.where((jnp.arange(memory.shape[1]) < slot[:, None])[..., None], memory[rows], 0)
    window = window.at[jnp.arange(len(rows)), slot].set(step)
    logits = model.apply({"params": params}, window, zr, method=Agent.act)
    return memory.at[rows].set(window), logits[jnp.arange(len(rows)), slot].argmax(-1)


def write_evaluation(workdir: Path, step: int, evaluation: dict) -> None:
    """One row per (step, level) in ``eval/eval.csv``, then ``eval/step_<n>.json`` (its presence marks the
    evaluation done). Rows a killed run wrote for this step are replaced, never doubled."""
    directory = Path(workdir) / "eval"
    directory.mkdir(parents=True, exist_ok=True)
    drop_rows_after(directory / "eval.csv", step - 1)
    for level, r in evaluation["levels"].items():
        append_csv(directory / "eval.csv", {"step": step, "level": level, **r})
    write_json(directory / f"step_{step:08d}.json", {"step": step, **evaluation})


def drop_evaluations_after(workdir: Path, step: int) -> None:
    """Forgets the evaluations after ``step``: a run resumed from there evaluates those steps again."""
    directory = Path(workdir) / "eval"
    drop_rows_after(directory / "eval.csv", step)
    for path in directory.glob("step_*.json"):
        if int(path.stem.removeprefix("step_")) > step:
            path.unlink()
