"""Stage 2: the Flax transformer agent and its data-parallel behavioral cloning."""

from lvaa_jax.agent.evaluate import evaluate
from lvaa_jax.agent.model import Agent, instruction_embedding
from lvaa_jax.agent.restore import RestoredAgent, restore_agent
from lvaa_jax.agent.train import make_mesh, make_train_step, train_and_evaluate

__all__ = [
    "Agent", "RestoredAgent", "evaluate", "instruction_embedding", "make_mesh", "make_train_step", "restore_agent",
    "train_and_evaluate",
]
