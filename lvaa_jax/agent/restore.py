"""Loading a trained agent back from its run folder, for embedding and evaluation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lvaa_jax.agent.checkpoint import restore, saved_config
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
    architecture at its initial parameters (the untrained control)."""
    workdir = Path(workdir)
    directory = (workdir / "checkpoints").absolute()
    config = saved_config(directory)
    dataset = load_demos(workdir / "demos", verify=False)
    model = Agent.from_config(config.model, dataset.tokenizer.size, dataset.max_instruction_length)
    state = create_state(model, config, make_mesh(jax.devices()[:1]))
    if not trained:
        return RestoredAgent(model, state.params, dataset.tokenizer, config, 0)
    with ocp.CheckpointManager(directory, item_names=("state", "data")) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise LvaaError(f"{directory}: no checkpoint{'' if step is None else f' at step {step}'}; train first")
        restored = restore(manager, step, state, with_data=False)
    return RestoredAgent(model, restored["state"]["params"], dataset.tokenizer, config, int(step))
