"""The action space as the agent learns: the study's instructions embedded at several steps of training.

Whether a better agent moves closer to the language models needs the agent's space at several points of
training. Checkpoints hold the whole training state and only the last few are kept; a snapshot holds only
what the alignment stage reads: the instruction set embedded through the instruction pathway, every layer,
as an embedding table (``embeddings/<space>.npz`` format) under ``<workdir>/snapshots/``. Recording one
reads the parameters and nothing else (no random key, no data), so training is unchanged by it, and a
resumed run rewrites the snapshots from its checkpoint on with the same values as an uninterrupted run.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from pathlib import Path

import jax
import ml_collections

from lvaa_jax.agent.model import Agent, embed_instructions
from lvaa_jax.babyai import Tokenizer
from lvaa_jax.embeddings import EmbeddingTable, instruction_set, load_table, save_table
from lvaa_jax.errors import LvaaError
from lvaa_jax.files import sha256_file

log = logging.getLogger(__name__)
FOLDER = "snapshots"
_NAME = re.compile(r"action_step_(\d{8})\.npz")


def snapshot_path(workdir: str | Path, step: int) -> Path:
    return Path(workdir) / FOLDER / f"action_step_{step:08d}.npz"


class SnapshotRecorder:
    """Records the action space at step 0, every ``train.snapshot_every`` steps and at the last step.

    Built before training binds the run folder to its config, so that a bad setting or a missing
    instruction file fails first; the instruction set is read once, here.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, model: Agent, tokenizer: Tokenizer):
        self.every = config.train.snapshot_every  # 0: never (its bound is checked with train's settings)
        self.last_step = config.train.steps
        self.workdir = Path(workdir)
        self.model, self.tokenizer = model, tokenizer
        self.instructions = instruction_set(config, self.workdir) if self.every else []
        self.pooling = config.model.pooling

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.last_step)

    def record_if_due(self, step: int, params) -> None:
        """Writes the snapshot of ``params`` at ``step`` when one is due there (step 0 is always due)."""
        if not self.due(step) or jax.process_index() != 0:
            return
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        meta = {
            "space": "action", "model": "lvaa_jax agent (instruction pathway)", "step": step,
            "config_sha256": sha256_file(self.workdir / "checkpoints" / "config.json"),
            "pooling": self.pooling, "layers": "all", "date": date,
        }
        start = time.perf_counter()
        embeddings = embed_instructions(self.model, params, self.tokenizer, self.instructions)
        path = save_table(snapshot_path(self.workdir, step), embeddings, self.instructions, meta)
        log.info("action space at step %d: %s (%.2f s)", step, path, time.perf_counter() - start)


def load_snapshots(workdir: str | Path) -> dict[int, EmbeddingTable]:
    """Every snapshot in ``<workdir>/snapshots``, by step, in step order (empty when there are none)."""
    folder = Path(workdir) / FOLDER
    found = sorted((int(m.group(1)), p) for p in folder.glob("action_step_*.npz") if (m := _NAME.fullmatch(p.name)))
    snapshots = {}
    for step, path in found:
        try:
            snapshots[step] = load_table(path)
        except LvaaError as e:  # written atomically, so damaged after the fact: the others still score
            raise LvaaError(f"{e}; delete this snapshot to score the others (the curve then lacks step {step})") from None
    return snapshots
