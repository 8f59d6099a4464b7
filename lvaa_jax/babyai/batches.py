"""Fixed-shape, padded, masked windows of trajectories for behavioral cloning.

An episode is cut into consecutive windows of ``context`` steps (the agent's memory is reset at each
window start, in training and in closed-loop evaluation alike, so the two see the same inputs). Each
epoch visits every window once in an order drawn from ``(seed, epoch)``; the iterator's whole state is
one integer, the number of batches served, so a checkpoint restores it exactly.

The step arrays are read into memory once (149 bytes per step: 230 MB for configs/paper.py): windows
drawn at random from memory-mapped shards cost a page read each where the page cache is cold, which made
a batch of the paper config 38 ms on a GPU host, six times the jitted step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from lvaa_jax.babyai.dataset import STEP_ARRAYS, DemoDataset
from lvaa_jax.errors import LvaaError

Batch = dict[str, np.ndarray]


class WindowBatches(Iterator[Batch]):
    """Yields numpy batches (ready for ``jax.device_put``)::

        image      uint8 [B, T, 7, 7, 3]     direction  int32 [B, T]     action  int32 [B, T]
        mask       bool  [B, T]  (real steps)  tokens     int32 [B, L]     token_mask bool [B, L]
        level_id   int32 [B]
    """

    def __init__(self, dataset: DemoDataset, batch_size: int, context: int, seed: int, position: int = 0):
        if context < 1 or batch_size < 1:
            raise LvaaError(f"batch_size and context must be positive, got {batch_size} and {context}")
        self.dataset, self.batch_size, self.context, self.seed = dataset, batch_size, context, seed
        chunks = -(-dataset.length // context)  # windows per episode, ceil
        self.window_episode = np.repeat(np.arange(dataset.num_episodes), chunks)
        self.window_offset = (np.arange(len(self.window_episode)) - np.repeat(np.cumsum(chunks) - chunks, chunks)) * context
        self.batches_per_epoch = len(self.window_episode) // batch_size
        if self.batches_per_epoch == 0:
            raise LvaaError(
                f"{dataset.path}: {len(self.window_episode)} windows of {context} steps, fewer than one batch of "
                f"{batch_size}; make more demos or lower config.train.batch_size"
            )
        self.tokens, self.token_mask = dataset.tokenizer.encode_batch(dataset.missions, dataset.max_instruction_length)
        self.steps = {name: np.concatenate([shard[name] for shard in dataset.steps]) for name in STEP_ARRAYS}
        shard_offset = np.cumsum([0] + [len(shard["action"]) for shard in dataset.steps])
        self.episode_start = shard_offset[dataset.shard] + dataset.start  # in self.steps
        self.position = position
        self._epoch_order = (-1, np.empty(0, np.int64))  # (epoch, its window order): drawn once per epoch

    def state(self) -> dict[str, int]:
        return {"position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

    def __next__(self) -> Batch:
        batch = self.batch_at(self.position)
        self.position += 1
        return batch

    def batch_at(self, position: int) -> Batch:
        """The batch served at ``position``: a pure function of (dataset, seed, position)."""
        epoch, index = divmod(position, self.batches_per_epoch)
        if self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.window_episode)))
        windows = self._epoch_order[1][index * self.batch_size : (index + 1) * self.batch_size]
        return self.windows(self.window_episode[windows], self.window_offset[windows])

    def windows(self, episodes: np.ndarray, offsets: np.ndarray) -> Batch:
        """Gathers windows [offset, offset + T) of the given episodes (padding repeats a real step, then zeroed)."""
        d = self.dataset
        mask = offsets[:, None] + np.arange(self.context) < d.length[episodes][:, None]
        start = self.episode_start[episodes][:, None]
        index = np.where(mask, start + offsets[:, None] + np.arange(self.context), start)
        out = {name: self.steps[name][index] for name in STEP_ARRAYS}
        for array in out.values():
            array *= mask.reshape(mask.shape + (1,) * (array.ndim - 2)).astype(array.dtype)
        mission = d.mission_id[episodes]
        return {"image": out["image"], "direction": out["direction"].astype(np.int32),
                "action": out["action"].astype(np.int32), "mask": mask, "tokens": self.tokens[mission],
                "token_mask": self.token_mask[mission], "level_id": d.level_id[episodes].astype(np.int32)}
