"""Loading a trained agent back from its run folder, for embedding and evaluation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np

from lvaa_jax.agent.checkpoint import open_manager, restore_newest, saved_config
from lvaa_jax.agent.model import Agent, embed_instructions
from lvaa_jax.agent.train import create_state, make_mesh
from lvaa_jax.babyai import Tokenizer, load_demos
from lvaa_jax.errors import LvaaError


@dataclasses.dataclass(frozen=True)
class RestoredAgent:
    model: Agent
    params: dict
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict
    step: int  # 0 for the untrained control

    def embed(self, instructions: list[str], all_layers: bool = True) -> np.ndarray:
        """float32 [layers, N, width] (or [N, width]): the instruction pathway's pooled embeddings."""
        return embed_instructions(self.model, self.params, self.tokenizer, instructions, all_layers)


def restore_agent(workdir: str | Path, step: int | None = None, trained: bool = True) -> RestoredAgent:
    """The agent of ``<workdir>``: its newest checkpoint (or ``step``), or with ``trained=False`` the same
    architecture at its initial parameters (the untrained control). A damaged newest checkpoint is a
    one-line error pointing to training, which restores it exactly: the run's agent is the newest one.

    It reads on this process alone, onto its first device (in a job of several processes, process 0
    embeds while the others wait)."""
    workdir = Path(workdir)
    directory = (workdir / "checkpoints").absolute()
    config = saved_config(directory)
    dataset = load_demos(workdir / "demos", verify=False)
    model = Agent.from_config(config.model, dataset.tokenizer.size, dataset.max_instruction_length)
    state = create_state(model, config, make_mesh(jax.local_devices()[:1]))
    if not trained:
        return RestoredAgent(model, state.params, dataset.tokenizer, config, 0)
    with open_manager(directory, alone=True, create=False) as manager:
        if step is not None and step not in manager.all_steps():
            raise LvaaError(f"{directory}: no checkpoint at step {step}; its steps: {list(manager.all_steps())}")
        found = restore_newest(manager, state, with_data=False, steps=None if step is None else [step])
    if found is None:
        raise LvaaError(f"{directory}: no checkpoint; train first")
    step, restored, damaged = found
    if damaged:  # an older agent than the run's would be embedded under the run's name
        raise LvaaError(
            f"{directory}: the newest checkpoint (step {damaged[0]}) is damaged (see the warning above); run "
            f"scripts/train.py with this run's config again: it trains from step {step} to the same parameters"
        )
    return RestoredAgent(model, restored["state"]["params"], dataset.tokenizer, config, int(step))
