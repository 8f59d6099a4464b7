"""Orbax checkpoints of the whole training state (params, optimiser state, step, data position)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState

from lvaa_jax.babyai import WindowBatches
from lvaa_jax.errors import LvaaError

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"

# A checkpoint can only continue a run whose settings give the same parameter shapes and the same data
# stream; other settings (steps, logging, evaluation) may change between runs.
BINDING_KEYS = ("seed", "model", "data", "train.batch_size", "train.windows_per_row")


def _binding(config: ml_collections.ConfigDict) -> dict:
    full = json.loads(config.to_json())
    out = {}
    for key in BINDING_KEYS:
        value = full
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None  # a key older runs lack: None
        out[key] = value
    return out


def _differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} vs {b!r}"]


def saved_config(directory: Path) -> ml_collections.ConfigDict:
    path = directory / CONFIG_FILE
    if not path.exists():
        raise LvaaError(f"{directory}: no trained agent here (missing {CONFIG_FILE}); run scripts/train.py first")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_compatible(directory: Path, config: ml_collections.ConfigDict) -> bool:
    """True if ``directory`` holds checkpoints of this config, False if none; LvaaError for another config."""
    if not (directory / CONFIG_FILE).exists():
        return False
    differ = _differences(_binding(saved_config(directory)), _binding(config))
    if differ:
        raise LvaaError(
            f"{directory} holds a checkpoint of another config ({'; '.join(differ[:3])}); "
            "use another --workdir or delete its checkpoints"
        )
    return True


class Checkpoints:
    """Saves every ``checkpoint_every`` steps, keeps the last few, restores the newest exactly."""

    def __init__(self, directory: Path, config: ml_collections.ConfigDict, keep: int):
        directory = directory.absolute()
        directory.mkdir(parents=True, exist_ok=True)
        if not check_compatible(directory, config):
            (directory / CONFIG_FILE).write_text(config.to_json(indent=1) + "\n")
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "data"),
        )

    def restore_latest(self, state: TrainState, batches: WindowBatches) -> TrainState:
        step = self.manager.latest_step()
        if step is None:
            return state
        restored = restore(self.manager, step, state, with_data=True)
        batches.restore(restored["data"])
        log.info("resumed from the checkpoint at step %d", step)
        return state.replace(**restored["state"])

    def save(self, step: int, state: TrainState, batches: WindowBatches) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_saved_part(state)), data=ocp.args.JsonSave(batches.state())
            ),
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _saved_part(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def restore(manager: ocp.CheckpointManager, step: int, state: TrainState, with_data: bool) -> dict:
    """The checkpoint at ``step`` laid out like ``state`` (shapes, dtypes, shardings): {"state": ...} and,
    ``with_data``, the data iterator's position under "data". A checkpoint whose parameters do not fit the
    model (written by another version of the code) is a one-line error."""
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _saved_part(state))
    items = {"state": ocp.args.StandardRestore(target)} | ({"data": ocp.args.JsonRestore()} if with_data else {})
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as error:
        raise LvaaError(
            f"{manager.directory}: the checkpoint at step {step} does not fit this model (saved by another "
            f"version of lvaa_jax?): {str(error).splitlines()[0][:200].rstrip(':')}; "
            "use another --workdir or delete its checkpoints"
        ) from None
