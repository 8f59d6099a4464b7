"""Stage 2: behavioral cloning, one jitted data-parallel step, exact resume, closed-loop evaluation."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lvaa_jax.agent.checkpoint import Checkpoints, check_compatible, damage
from lvaa_jax.agent.evaluate import drop_evaluations_after, evaluate, write_evaluation
from lvaa_jax.agent.model import POOLINGS, Agent
from lvaa_jax.agent.snapshots import SnapshotRecorder
from lvaa_jax.babyai import DemoDataset, WindowBatches, load_demos
from lvaa_jax.babyai.generate import check_demos_match
from lvaa_jax.config_checks import (
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    check_section,
)
from lvaa_jax.distributed import local_copy, on_process_zero
from lvaa_jax.errors import LvaaError
from lvaa_jax.files import append_csv, drop_rows_after, naming
from lvaa_jax.progress import progress_bar
from lvaa_jax.runlock import holds_run_folder

log = logging.getLogger(__name__)
Batch = dict[str, jax.Array]


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over every device (of every host): the batch axis is split over it."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW after global-norm clipping; linear warmup, then cosine decay to 5% by the last step.

    A run shorter than its warmup (``--config.train.steps=500`` on the paper config) warms up over all
    but its last step.
    """
    warmup = min(train.warmup_steps, max(train.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate, warmup, max(train.steps, warmup + 1), train.learning_rate * 0.05
    )
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(schedule, weight_decay=train.weight_decay),
    )


def check_settings(config: ml_collections.ConfigDict) -> None:
    """The model, train and eval sections, before any work: a bad value is a one-line error."""
    check_model(config)
    check_section(config, "train", steps=POSITIVE_INT, batch_size=POSITIVE_INT, windows_per_row=POSITIVE_INT,
                  learning_rate=POSITIVE, warmup_steps=NON_NEGATIVE_INT, weight_decay=NON_NEGATIVE,
                  grad_clip=POSITIVE, log_every=POSITIVE_INT, checkpoint_every=POSITIVE_INT,
                  keep_checkpoints=POSITIVE_INT, eval_every=NON_NEGATIVE_INT, snapshot_every=NON_NEGATIVE_INT)
    check_section(config, "eval", episodes_per_level=POSITIVE_INT, max_steps=NON_NEGATIVE_INT)


def check_model(config: ml_collections.ConfigDict) -> None:
    check_section(config, "model", width=POSITIVE_INT, cell_width=POSITIVE_INT, num_heads=POSITIVE_INT,
                  instruction_layers=NON_NEGATIVE_INT, memory_layers=NON_NEGATIVE_INT, mlp_ratio=POSITIVE_INT,
                  context=POSITIVE_INT, dropout=FRACTION)
    model = config.model
    if model.pooling not in POOLINGS:
        raise LvaaError(f"config.model.pooling: unknown pooling {model.pooling!r}; known: {', '.join(POOLINGS)}")
    if model.width % model.num_heads or model.cell_width % model.num_heads:
        raise LvaaError(
            f"config.model.width ({model.width}) and cell_width ({model.cell_width}) must be multiples of "
            f"num_heads ({model.num_heads})"
        )
    if model.dtype not in ("float32", "bfloat16"):
        raise LvaaError(f"config.model.dtype must be float32 or bfloat16, got {model.dtype!r}")


def build_agent(config: ml_collections.ConfigDict, dataset: DemoDataset) -> Agent:
    check_model(config)
    return Agent.from_config(config.model, dataset.tokenizer.size, dataset.max_instruction_length)


def example_batch(model: Agent, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Zeros of the batch shapes, for initialisation and compilation."""
    t, length = model.context, model.max_instruction_length
    steps = np.zeros((batch_size, t), np.int32)
    return {
        "image": np.zeros((batch_size, t, 7, 7, 3), np.uint8), "direction": steps, "segment": steps,
        "position": np.broadcast_to(np.arange(t, dtype=np.int32), (batch_size, t)),
        "tokens": np.ones((batch_size, 1, length), np.int32), "token_mask": np.ones((batch_size, 1, length), bool),
    }


def init_params(model: Agent, seed: int):
    """Initial parameters; the untrained-agent control of the study uses exactly these."""
    return jax.jit(model.init)(jax.random.key(seed), example_batch(model))["params"]


def bc_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked cross-entropy of the expert's actions, and the fraction of steps predicted right."""
    mask = batch["mask"].astype(jnp.float32)
    steps = jnp.maximum(mask.sum(), 1.0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["action"])
    loss = (nll * mask).sum() / steps
    accuracy = ((logits.argmax(-1) == batch["action"]) * mask).sum() / steps
    return loss, {"loss": loss, "accuracy": accuracy}


@functools.cache  # one compilation per (model, mesh, seed) in a process
def make_train_step(model: Agent, mesh: Mesh, seed: int) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The jitted BC step: batch sharded over the mesh's ``data`` axis, parameters replicated.

    XLA inserts the gradient all-reduce; the result equals the single-device step up to float rounding.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        dropout = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_fn(params):
            logits = model.apply({"params": params}, batch, train=True, rngs={"dropout": dropout})
            return bc_loss(logits, batch)

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state.apply_gradients(grads=grads), metrics

    return jax.jit(step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated), donate_argnums=0)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> Batch:
    """Places this process's rows of a global numpy batch on the mesh (one process: all of them): the rows
    its devices hold, wherever the mesh puts them."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    local = process_rows(sharding, len(next(iter(batch.values()))))
    return {k: jax.make_array_from_process_local_data(sharding, v[local], v.shape) for k, v in batch.items()}


def process_rows(sharding: NamedSharding, rows: int) -> slice:
    """The rows of a [rows, ...] array that this process's devices hold under ``sharding`` (contiguous on a
    one-axis mesh)."""
    held = [index[0] for index in sharding.addressable_devices_indices_map((rows,)).values()]
    return slice(min(s.start or 0 for s in held), max(rows if s.stop is None else s.stop for s in held))


def create_state(model: Agent, config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
    """Initial parameters and optimiser state, built in one jitted call directly replicated on the mesh."""
    tx = make_optimizer(config.train)

    def create(key: jax.Array) -> TrainState:
        params = model.init(key, example_batch(model))["params"]
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    return jax.jit(create, out_shardings=NamedSharding(mesh, PartitionSpec()))(jax.random.key(config.seed))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> dict:
    """Trains (or resumes) the agent on ``<workdir>/demos`` and returns the final closed-loop evaluation."""
    check_settings(config)
    return _train_and_evaluate(config, Path(workdir), progress)


@holds_run_folder
def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, progress: bool) -> dict:
    dataset = load_demos(workdir / "demos")
    check_demos_match(config, dataset)
    finished = on_process_zero(lambda: finished_evaluation(config, workdir), "the check for a finished run")
    if finished is not None:
        log.info("%s: training finished earlier; its final evaluation is in %s/eval", workdir, workdir)
        return finished
    train = config.train
    mesh = make_mesh()
    if train.batch_size % mesh.size:
        raise LvaaError(f"config.train.batch_size={train.batch_size} must be a multiple of the {mesh.size} devices")
    model = build_agent(config, dataset)
    snapshots = SnapshotRecorder(config, workdir, model, dataset.tokenizer)  # reads the instruction set before work
    batches = WindowBatches(dataset, train.batch_size, model.context, config.seed, train.windows_per_row)
    log.info("%d windows in %d rows of %d steps per epoch: %.0f%% real steps, %d batches", len(batches.window_length),
             batches.rows_per_epoch, model.context, 100 * batches.fill, batches.batches_per_epoch)
    checkpoints = Checkpoints(workdir / "checkpoints", config, train.keep_checkpoints)
    state = checkpoints.restore_latest(create_state(model, config, mesh), batches)
    start = int(state.step)
    snapshots.record_if_due(start, state.params)  # step 0, or the step a resumed run starts from
    train_step = make_train_step(model, mesh, config.seed)
    writer = MetricsWriter(workdir / "metrics", resume_step=start)
    on_process_zero(lambda: drop_evaluations_after(workdir, start), f"{workdir / 'eval'}")
    pending: list[dict] = []
    tick = time.perf_counter()
    try:
        with progress_bar(total=train.steps, initial=start, desc="train", unit="step", disable=not progress) as bar:
            for step in range(start + 1, train.steps + 1):
                state, metrics = train_step(state, shard_batch(next(batches), mesh))
                if pending:
                    # At most two steps in flight: XLA:CPU's in-process collectives (several CPU devices)
                    # deadlock when many runs of one sharded program are queued; an accelerator still
                    # always has the next step waiting.
                    jax.block_until_ready(pending[-1])
                pending.append(metrics)
                if step % train.log_every == 0 or step == train.steps:
                    means = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
                    elapsed = time.perf_counter() - tick
                    means["steps_per_s"] = len(pending) / elapsed
                    writer.write(step, means, "train")
                    bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy']:.3f}")
                    pending, tick = [], time.perf_counter()
                if step % train.checkpoint_every == 0 or step == train.steps:
                    checkpoints.save(step, state, batches)
                snapshots.record_if_due(step, state.params)
                if train.eval_every and step % train.eval_every == 0 and step != train.steps:
                    evaluate_and_write(config, model, state.params, dataset, workdir, step, progress)
                bar.update()
    finally:
        checkpoints.close()
        writer.close()
    return evaluate_and_write(config, model, state.params, dataset, workdir, int(state.step), progress)


def finished_evaluation(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """The final evaluation of a finished run of this config in ``workdir``, or None if training must run."""
    workdir = Path(workdir)
    final = workdir / "eval" / f"step_{config.train.steps:08d}.json"
    checkpoint = workdir / "checkpoints" / str(config.train.steps)
    if not check_compatible(workdir / "checkpoints", config) or not final.exists():
        return None
    if not checkpoint.is_dir() or damage(checkpoint) is not None:  # train again from the newest intact one
        return None
    return json.loads(final.read_text())


def evaluate_and_write(config, model: Agent, params, dataset: DemoDataset, workdir: Path, step: int,
                       progress: bool) -> dict:
    """The closed-loop evaluation at ``step``, written to ``eval/``: by process 0 alone (on its copy of the
    parameters), the others waiting for its result."""

    def run() -> dict:
        evaluation = evaluate_agent(config, model, local_copy(params), dataset, progress)
        write_evaluation(workdir, step, evaluation)
        return evaluation

    return on_process_zero(run, f"the evaluation at step {step}")


def evaluate_agent(config, model: Agent, params, dataset: DemoDataset, progress: bool) -> dict:
    return evaluate(
        model, params, dataset.tokenizer, dataset.levels, config.eval.episodes_per_level, config.seed,
        max_steps=config.eval.max_steps, progress=progress,
    )


class MetricsWriter:
    """Tensorboard event files (tensorboardX: no TensorFlow needed) and one CSV per split.

    On resume, rows a killed run logged after its last checkpoint are dropped, so each step appears once.
    In a job of several processes, every process calls it and process 0 writes.
    """

    def __init__(self, directory: Path, resume_step: int):
        self.directory = directory
        self.tensorboard = None
        on_process_zero(lambda: self._open(resume_step), f"{directory}")

    def _open(self, resume_step: int) -> None:
        from tensorboardX import SummaryWriter

        self.directory.mkdir(parents=True, exist_ok=True)
        self.tensorboard = SummaryWriter(str(self.directory), purge_step=resume_step + 1)
        for path in self.directory.glob("*.csv"):
            drop_rows_after(path, resume_step)

    def write(self, step: int, values: dict[str, float], split: str) -> None:
        on_process_zero(lambda: self._write(step, values, split), f"{self.directory} at step {step}")

    def _write(self, step: int, values: dict[str, float], split: str) -> None:
        with naming(self.directory):  # tensorboardX's writes name no file
            for k, v in values.items():
                self.tensorboard.add_scalar(f"{split}/{k}", v, step)
        append_csv(self.directory / f"{split}.csv", {"step": step, **{k: f"{v:.6g}" for k, v in values.items()}})

    def close(self) -> None:
        def close() -> None:
            if self.tensorboard is not None:
                with naming(self.directory):
                    self.tensorboard.close()

        on_process_zero(close, f"{self.directory} closed")
