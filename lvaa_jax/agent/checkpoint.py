"""Orbax checkpoints of the whole training state (params, optimiser state, step, data position).

Each step folder also gets ``files.json``: the size and sha256 of every file orbax wrote there (as the
demo manifest does for shards). A restore checks it first, so a truncated or altered file is found by
name before orbax reads it, and the newest intact checkpoint is restored instead, with a warning. A
checkpoint without the record (killed between orbax's commit and the record) is restored unchecked.

In a job of several processes, every process saves and restores (orbax writes each array once, from the
process that holds its first replica); process 0 writes ``config.json`` and ``files.json``, checks a
step's files, and sets damaged steps aside, and every process takes its decisions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState

from lvaa_jax.babyai import WindowBatches
from lvaa_jax.distributed import gather, on_every_process, on_process_zero, process_index
from lvaa_jax.errors import LvaaError
from lvaa_jax.files import naming, read_json, sha256_file, write_json

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
FILES = "files.json"  # in each step folder: size and sha256 of every other file
DAMAGED = "damaged"  # training moves damaged step folders here (orbax ignores the name)

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
    return ml_collections.ConfigDict(read_json(path, "it records the config of these checkpoints: restore it, or "
                                               "train again in another --workdir"))


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
    """Saves every ``checkpoint_every`` steps, keeps the last few, restores the newest intact one exactly."""

    def __init__(self, directory: Path, config: ml_collections.ConfigDict, keep: int):
        directory = directory.absolute()

        def prepare() -> None:
            directory.mkdir(parents=True, exist_ok=True)
            if not check_compatible(directory, config):
                write_json(directory / CONFIG_FILE, json.loads(config.to_json()))

        on_process_zero(prepare, f"{directory / CONFIG_FILE}")
        # Saves are synchronous: files.json can only be written once orbax has committed the step, and
        # a save takes milliseconds at these sizes (every few hundred steps).
        self.manager = open_manager(directory, max_to_keep=keep, create=True, enable_async_checkpointing=False)

    def restore_latest(self, state: TrainState, batches: WindowBatches) -> TrainState:
        """The newest intact checkpoint restored into ``state`` and ``batches``; damaged newer ones are moved
        to ``checkpoints/damaged/`` (so that training can save those steps again)."""
        found = restore_newest(self.manager, state, with_data=True)
        if found is None:
            return state
        step, restored, damaged = found
        on_process_zero(lambda: self._set_aside(damaged), "damaged checkpoints set aside")
        if damaged:
            self.manager.reload()
        batches.restore(restored["data"])
        log.info("resumed from the checkpoint at step %d", step)
        return state.replace(**restored["state"])

    def _set_aside(self, damaged: list[int]) -> None:
        for bad in damaged:
            target = self.manager.directory / DAMAGED / str(bad)
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(exist_ok=True)
            os.replace(self.manager.directory / str(bad), target)
            log.warning("moved the damaged checkpoint of step %d to %s", bad, target)

    def save(self, step: int, state: TrainState, batches: WindowBatches) -> None:
        step_dir = Path(self.manager.directory) / str(step)
        try:
            with naming(step_dir), _errors_raised_not_logged():
                self.manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(_saved_part(state)), data=ocp.args.JsonSave(batches.state())
                    ),
                )
                self.manager.wait_until_finished()
        except Exception as error:
            raise storage_error(error, self.manager.directory) or error from None
        on_process_zero(lambda: record_files(step_dir), f"{step_dir / FILES}")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def open_manager(directory: Path, alone: bool = False, **options) -> ocp.CheckpointManager:
    """Orbax's manager of ``directory``, used by every process of the job (``alone``: by this process only,
    as process 0 reading an agent while the others wait)."""
    _drop_abandoned_callback_errors()
    if alone:
        options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
            primary_host=process_index(), active_processes={process_index()})
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(**options), item_names=("state", "data")
    )


def _saved_part(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def record_files(step_dir: Path) -> None:
    """Writes ``files.json``: size and sha256 of every file of a committed step folder."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != FILES)
    write_json(step_dir / FILES, {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                                  for p in files})


def damage(step_dir: Path) -> str | None:
    """What is wrong with a step folder by its ``files.json`` (a missing, truncated or altered file), or None
    when it is intact or has no record."""
    record = step_dir / FILES
    if not record.exists():
        return None
    try:
        expected = json.loads(record.read_text())
    except ValueError:
        return f"{record} is not valid JSON"
    for name, want in expected.items():
        path = step_dir / name
        if not path.exists():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} has {size} bytes, {want['bytes']} were written"
        if sha256_file(path) != want["sha256"]:
            return f"{path} differs from what was written (sha256)"
    return None


def restore_newest(
    manager: ocp.CheckpointManager, state: TrainState, with_data: bool, steps: list[int] | None = None
) -> tuple[int, dict, list[int]] | None:
    """The newest checkpoint (of ``steps``, default all) that restores: (step, restored, the newer damaged
    steps skipped), or None when there is none. Each skipped step is logged with what is wrong with it;
    when every one is damaged, a one-line error says so.

    In a job of several processes, process 0 checks the files and every process restores; a step that one
    process cannot read is skipped by all."""
    problems = {}
    for step in sorted(manager.all_steps() if steps is None else steps, reverse=True):
        step_dir = Path(manager.directory) / str(step)
        problem, checked = on_process_zero(lambda: (damage(step_dir), (step_dir / FILES).exists()),  # noqa: B023
                                           f"the check of {step_dir}")
        if problem is None:
            restored, problem = on_every_process(
                lambda: _restored_or_problem(manager, step, state, with_data, checked),  # noqa: B023
                f"the restore of {step_dir}")
            problem = next(filter(None, gather(problem, f"the restore of {step_dir}")), None)
            if problem is None:
                return step, restored, list(problems)
        log.warning("%s: the checkpoint at step %d is damaged (%s); trying the one before", manager.directory,
                    step, problem)
        problems[step] = problem
    if problems:
        listed = "; ".join(f"step {step}: {problem}" for step, problem in problems.items())
        raise LvaaError(
            f"{manager.directory}: no checkpoint can be restored ({listed}); train again in another --workdir, "
            "or move that folder aside"
        )
    return None


class _Unreadable(Exception):
    """A checkpoint without ``files.json`` that orbax failed to read."""


def _restored_or_problem(manager: ocp.CheckpointManager, step: int, state: TrainState, with_data: bool,
                         checked: bool) -> tuple[dict | None, str | None]:
    try:
        return restore(manager, step, state, with_data, checked), None
    except _Unreadable as error:
        return None, str(error)


def restore(manager: ocp.CheckpointManager, step: int, state: TrainState, with_data: bool,
            checked: bool = True) -> dict:
    """The checkpoint at ``step`` laid out like ``state`` (shapes, dtypes, shardings): {"state": ...} and,
    ``with_data``, the data iterator's position under "data".

    A ``checked`` checkpoint (its files are as written) that does not fit the model was written by
    another version of the code: a one-line error. An unchecked one that fails may be damaged instead:
    :class:`_Unreadable`, for the caller to try an older one.
    """
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _saved_part(state))
    items = {"state": ocp.args.StandardRestore(target)} | ({"data": ocp.args.JsonRestore()} if with_data else {})
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise bare Exception for unreadable data
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:200].rstrip(":")
        if not checked:
            raise _Unreadable(f"orbax could not read it: {first_line}") from None
        if isinstance(error, (ValueError, KeyError, TypeError)):
            raise LvaaError(
                f"{manager.directory}: the checkpoint at step {step} does not fit this model (saved by another "
                f"version of lvaa_jax?): {first_line}; use another --workdir, or move its checkpoints aside"
            ) from None
        raise


def storage_error(error: Exception, directory: Path) -> OSError | None:
    """The OSError inside a tensorstore failure (it reports ``[os_error_code='28']`` in a ValueError), so
    that a full or read-only disk ends as the one-line error of any other failed write."""
    code = re.search(r"\[os_error_code='(\d+)'\]", str(error))
    if code is None:
        return None
    path = re.search(r'"(/[^"]+)"', str(error))
    return OSError(int(code.group(1)), os.strerror(int(code.group(1))), path.group(1) if path else str(directory))


@contextlib.contextmanager
def _errors_raised_not_logged() -> Iterator[None]:
    """Orbax logs each failed write of a save with its traceback (a full disk: a hundred lines) before
    raising the failure, which the caller reports in one line; keep its log quiet meanwhile."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _drop_abandoned_callback_errors() -> None:
    """After a failed orbax read or write, tensorstore completes the other pending reads into orbax's
    closed event loop, and each prints a ``RuntimeError: Event loop is closed`` traceback: noise around
    the real error, which is raised in the main thread. Filters those out, once per process."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_errors", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook
