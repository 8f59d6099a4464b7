"""Fixed-shape, padded, masked batches of trajectory windows for behavioral cloning, packed into rows.

An episode is cut into consecutive windows of at most ``context`` steps (the agent's memory is reset at
each window start, in training and in closed-loop evaluation alike, so the two see the same inputs).
Most BabyAI episodes are far shorter than a window (7.9 of 16 steps on the default levels), so a batch
row of ``context`` steps holds up to ``windows_per_row`` windows one after another; the model keeps them
apart with a per-step ``segment`` index (attention only within a segment, each step conditioned on its
own segment's instruction) and ``position`` (step index within its window). A packed row gives each of
its windows exactly the logits it would get alone; on the default data two windows per row fill 90% of
the steps (three: 96%) instead of 47%.

Rows are packed best-fit over windows in decreasing length. That packing depends on the lengths alone,
so every epoch has the same rows-to-window-slots layout, and so the same number of batches; each epoch
draws which window of a given length fills which slot, and the order of the rows, from ``(seed,
epoch)``. Every window is served once per epoch (the rows of an incomplete last batch are skipped). The
iterator's whole state is one integer, the number of batches served, so a checkpoint restores it exactly.

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


def pack_rows(lengths: np.ndarray, capacity: int, max_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit packing of windows given in decreasing length: (row, slot within the row) of each.

    Each window goes to the open row with the least free space that still fits it (a row closes when
    full or holding ``max_windows``). The result depends on the sequence of lengths only.
    """
    rows_with_space: list[list[int]] = [[] for _ in range(capacity + 1)]  # free steps -> open rows
    row, slot, used = np.empty(len(lengths), np.int64), np.empty(len(lengths), np.int64), []
    for i, length in enumerate(lengths.tolist()):
        for space in range(length, capacity + 1):
            if rows_with_space[space]:
                row[i] = rows_with_space[space].pop()
                break
        else:
            row[i], space = len(used), capacity
            used.append(0)
        slot[i] = used[row[i]]
        used[row[i]] += 1
        if used[row[i]] < max_windows and space > length:
            rows_with_space[space - length].append(int(row[i]))
    return row, slot


class WindowBatches(Iterator[Batch]):
    """Yields numpy batches (ready for ``jax.device_put``), B rows of T steps holding up to S windows::

        image      uint8 [B, T, 7, 7, 3]   direction int32 [B, T]   action   int32 [B, T]
        mask       bool  [B, T]  (real steps; padding sits at the end of a row, after every window)
        segment    int32 [B, T]  (which of the row's windows a step belongs to; padding: the last one)
        position   int32 [B, T]  (step index within its window)
        tokens     int32 [B, S, L]   token_mask bool [B, S, L]   (an unused window slot has no tokens)
        level_id   int32 [B, S]  (-1 for an unused slot)
    """

    def __init__(self, dataset: DemoDataset, batch_size: int, context: int, seed: int, windows_per_row: int = 1,
                 position: int = 0):
        if context < 1 or batch_size < 1 or windows_per_row < 1:
            raise LvaaError(
                f"config.train.batch_size, config.model.context and config.train.windows_per_row must be positive, "
                f"got {batch_size}, {context} and {windows_per_row}"
            )
        self.dataset, self.batch_size, self.context, self.seed = dataset, batch_size, context, seed
        self.windows_per_row = windows_per_row
        chunks = -(-dataset.length // context)  # windows per episode, ceil
        self.window_episode = np.repeat(np.arange(dataset.num_episodes), chunks)
        self.window_offset = (np.arange(len(self.window_episode)) - np.repeat(np.cumsum(chunks) - chunks, chunks)) * context
        self.window_length = np.minimum(dataset.length[self.window_episode] - self.window_offset, context)
        self._row, self._slot = pack_rows(np.sort(self.window_length)[::-1], context, windows_per_row)
        self.rows_per_epoch = int(self._row.max()) + 1
        self.batches_per_epoch = self.rows_per_epoch // batch_size
        if self.batches_per_epoch == 0:
            raise LvaaError(
                f"{dataset.path}: {len(self.window_episode)} windows of up to {context} steps fill "
                f"{self.rows_per_epoch} rows, fewer than one batch of {batch_size}; make more demos or lower "
                "config.train.batch_size"
            )
        self.tokens, self.token_mask = dataset.tokenizer.encode_batch(dataset.missions, dataset.max_instruction_length)
        self.steps = {name: np.concatenate([shard[name] for shard in dataset.steps]) for name in STEP_ARRAYS}
        shard_offset = np.cumsum([0] + [len(shard["action"]) for shard in dataset.steps])
        self.episode_start = shard_offset[dataset.shard] + dataset.start  # in self.steps
        self.position = position
        self._epoch = (-1, np.empty((0, windows_per_row), np.int64))  # (epoch, its rows of window ids, -1: none)

    @property
    def fill(self) -> float:
        """Fraction of the served steps that are real (the rest is padding)."""
        return float(self.window_length.sum() / (self.rows_per_epoch * self.context))

    def state(self) -> dict[str, int]:
        return {"position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

    def __next__(self) -> Batch:
        batch = self.batch_at(self.position)
        self.position += 1
        return batch

    def batch_at(self, position: int) -> Batch:
        """The batch served at ``position``: a pure function of (dataset, seed, windows_per_row, position)."""
        epoch, index = divmod(position, self.batches_per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch_rows(epoch))
        rows = self._epoch[1][index * self.batch_size : (index + 1) * self.batch_size]
        windows = np.maximum(rows, 0)  # an unused slot (-1) reads window 0 with length 0
        return self.rows(self.window_episode[windows], self.window_offset[windows],
                         np.where(rows >= 0, self.window_length[windows], 0))

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """[rows_per_epoch, S] window ids of one epoch, rows in served order."""
        rng = np.random.default_rng([self.seed, epoch])
        shuffled = rng.permutation(len(self.window_length))
        by_length = shuffled[np.argsort(-self.window_length[shuffled], kind="stable")]
        rows = np.full((self.rows_per_epoch, self.windows_per_row), -1, np.int64)
        rows[self._row, self._slot] = by_length
        return rows[rng.permutation(self.rows_per_epoch)]

    def windows(self, episodes: np.ndarray, offsets: np.ndarray) -> Batch:
        """One row per window [offset, offset + T) of the given episodes."""
        lengths = np.minimum(self.dataset.length[episodes] - offsets, self.context)
        return self.rows(episodes[:, None], offsets[:, None], lengths[:, None])

    def rows(self, episodes: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> Batch:
        """Rows of windows laid end to end: ``episodes``, ``offsets``, ``lengths`` [B, S] (length 0: an unused
        slot, after the used ones). Padding repeats a real step and is then zeroed."""
        d, t = self.dataset, np.arange(self.context)
        used = lengths > 0
        starts = np.where(used, np.cumsum(lengths, axis=1) - lengths, self.context)  # unused slots start nowhere
        segment = (t[None, None, :] >= starts[:, :, None]).sum(1) - 1  # [B, T]
        position = t - np.take_along_axis(starts, segment, 1)
        mask = position < np.take_along_axis(lengths, segment, 1)
        episode = np.take_along_axis(episodes, segment, 1)
        first = self.episode_start[episode]
        index = np.where(mask, first + np.take_along_axis(offsets, segment, 1) + position, first)
        out = {name: self.steps[name][index] for name in STEP_ARRAYS}
        for array in out.values():
            array *= mask.reshape(mask.shape + (1,) * (array.ndim - 2)).astype(array.dtype)
        mission = d.mission_id[episodes]
        return {"image": out["image"], "direction": out["direction"].astype(np.int32),
                "action": out["action"].astype(np.int32), "mask": mask, "segment": segment.astype(np.int32),
                "position": position.astype(np.int32), "tokens": self.tokens[mission] * used[..., None],
                "token_mask": self.token_mask[mission] & used[..., None],
                "level_id": np.where(used, d.level_id[episodes], -1).astype(np.int32)}
