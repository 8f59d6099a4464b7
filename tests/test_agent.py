"""Stage 2: the agent's shapes, its instruction pathway, data-parallel BC, exact resume, evaluation."""

import json
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from jax.sharding import NamedSharding, PartitionSpec
from tiny_runs import tiny_config

from configs.default import get_config
from lvaa_jax.agent import Agent, evaluate, instruction_embedding, make_mesh, make_train_step, restore_agent
from lvaa_jax.agent.evaluate import _observe_and_act
from lvaa_jax.agent.model import LayerNorm, ObservationEncoder, normalize
from lvaa_jax.agent.snapshots import SnapshotRecorder, load_snapshots, snapshot_path
from lvaa_jax.agent.train import (
    build_agent,
    create_state,
    init_params,
    make_optimizer,
    shard_batch,
    train_and_evaluate,
)
from lvaa_jax.babyai import WindowBatches
from lvaa_jax.embeddings import instruction_set
from lvaa_jax.errors import LvaaError


@pytest.fixture(scope="module")
def run(trained_run):
    """A tiny run: demos, 20 training steps, checkpoints every 10 (conftest.py)."""
    return trained_run


def test_layer_norm_with_its_own_backward_equals_flax():
    x = 3 * jax.random.normal(jax.random.key(0), (4, 9, 32)) + 1
    cotangent = jax.random.normal(jax.random.key(1), x.shape)
    ours, theirs = LayerNorm(jnp.float32), nn.LayerNorm(dtype=jnp.float32)
    params = theirs.init(jax.random.key(2), x)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(3), p.shape), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours.init(jax.random.key(2), x), params)

    def loss(module):
        return lambda params, x: jnp.sum(module.apply(params, x) * cotangent)

    chex.assert_trees_all_close(ours.apply(params, x), theirs.apply(params, x), atol=1e-5)
    chex.assert_trees_all_close(jax.grad(loss(ours), argnums=(0, 1))(params, x),
                                jax.grad(loss(theirs), argnums=(0, 1))(params, x), atol=1e-4)


def test_cell_table_lookup_equals_normalising_every_cell():
    """Cells gathered from the table of every (object, colour, state, position) combination are the
    normalised sums of their own embeddings, in values and in gradients."""
    image = np.stack([np.random.default_rng(i).integers(0, n, (2, 3, 7, 7)) for i, n in enumerate((11, 6, 3))], -1)
    image = image.astype(np.uint8)
    encoder = ObservationEncoder(width=16, cell_width=8, num_heads=2, dtype=jnp.float32)
    params = encoder.init(jax.random.key(1), image, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3, 16)))["params"]

    def per_cell(params):
        cells = image.astype(np.int32).reshape(2, 3, 49, 3)
        return normalize(params["object"]["embedding"][cells[..., 0]] + params["colour"]["embedding"][cells[..., 1]]
                         + params["state"]["embedding"][cells[..., 2]] + params["cell"])

    def from_table(params):
        return encoder.apply({"params": params}, image, method=ObservationEncoder.normalized_cells)

    cotangent = jax.random.normal(jax.random.key(2), (2, 3, 49, 8))
    chex.assert_trees_all_close(from_table(params), per_cell(params), atol=1e-5)
    chex.assert_trees_all_close(*(jax.grad(lambda p, f=f: jnp.sum(f(p) * cotangent))(params) for f in (from_table, per_cell)),
                                atol=1e-4)


def test_bfloat16_gradients_scatter_in_float32(run):
    """Every gather of the bfloat16 model reads float32, so its gradient's scatter-adds accumulate in
    float32 (bfloat16 ones run as compare-and-swap loops on a GPU, and round thousands of sums per row)."""
    config, _, dataset, _ = run
    config = config.copy_and_resolve_references()
    config.model.dtype = "bfloat16"
    model = build_agent(config, dataset)
    batch = next(WindowBatches(dataset, 4, model.context, seed=0, windows_per_row=2))
    params = create_state(model, config, make_mesh(jax.devices()[:1])).params
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, batch, train=True))))(params))
    scatters = [line.split("=")[0] for line in jaxpr.splitlines() if re.search(r"= scatter[-_]add\[", line)]
    assert len(scatters) >= 5  # words, cell table, direction, step position, instruction vector per step
    assert not [s for s in scatters if "bf16[" in s], scatters


def test_shapes(run):
    config, _, dataset, _ = run
    model = build_agent(config, dataset)
    batch = next(WindowBatches(dataset, 4, model.context, seed=0))
    params = create_state(model, config, make_mesh(jax.devices()[:1])).params
    logits = jax.jit(model.apply)({"params": params}, batch)
    chex.assert_shape(logits, (4, model.context, 7))
    chex.assert_tree_all_finite(logits)
    tokens, token_mask = batch["tokens"][:, 0], batch["token_mask"][:, 0]
    all_layers = instruction_embedding(params, tokens, token_mask, model=model, layers=(0, 1))
    chex.assert_shape(all_layers, (2, 4, model.width))
    z = instruction_embedding(params, tokens, token_mask, model=model)
    chex.assert_trees_all_close(z, all_layers[-1])


def test_a_packed_row_gives_each_window_the_logits_it_gets_alone(run):
    """Several windows in one row (segment mask, per-window positions and instructions) are computed
    exactly as if each had a row of its own."""
    config, _, dataset, _ = run
    model = build_agent(config, dataset)
    params = init_params(model, seed=1)
    packed = WindowBatches(dataset, 4, model.context, seed=0, windows_per_row=3)
    batch = packed.batch_at(0)
    assert (batch["segment"].max(1) > 0).any(), "no row of this test batch holds two windows"
    logits = np.asarray(jax.jit(model.apply)({"params": params}, batch))
    rows = packed.epoch_rows(0)[:4]
    for row, windows in enumerate(rows):
        for segment, window in enumerate(windows[windows >= 0]):
            alone = packed.windows(packed.window_episode[window : window + 1], packed.window_offset[window : window + 1])
            steps = (batch["segment"][row] == segment) & batch["mask"][row]
            np.testing.assert_array_equal(batch["action"][row][steps], alone["action"][0][alone["mask"][0]])
            expected = np.asarray(jax.jit(model.apply)({"params": params}, alone))[0][alone["mask"][0]]
            np.testing.assert_allclose(logits[row][steps], expected, atol=1e-5)


def test_instruction_embedding_depends_on_the_instruction_alone(run):
    config, _, dataset, _ = run
    model = build_agent(config, dataset)
    params = create_state(model, config, make_mesh(jax.devices()[:1])).params
    missions = list(dataset.missions[:5])
    tokens, mask = dataset.tokenizer.encode_batch(missions, model.max_instruction_length)
    together = instruction_embedding(params, tokens, mask, model=model)
    alone = instruction_embedding(params, tokens[2:3], mask[2:3], model=model)
    chex.assert_trees_all_close(together[2:3], alone, atol=1e-6)
    repeated = instruction_embedding(params, np.repeat(tokens[:1], 3, 0), np.repeat(mask[:1], 3, 0), model=model)
    chex.assert_trees_all_equal(repeated[0], repeated[1], repeated[2])
    # The policy's instruction vector is this one, whatever the observation: changing the image changes
    # the logits but goes nowhere near the instruction pathway's inputs.
    assert "image" not in Agent.embed_instruction.__code__.co_varnames


def train_on_one_batch(config, dataset):
    """``config.train.steps`` steps on one batch of 8 windows: the final state, losses and metrics."""
    model = build_agent(config, dataset)
    mesh = make_mesh()
    state = create_state(model, config, mesh)
    step = make_train_step(model, mesh, config.seed)
    batch = shard_batch(WindowBatches(dataset, 8, model.context, seed=0).batch_at(0), mesh)
    losses = []
    for _ in range(config.train.steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))  # waits: 8 CPU devices deadlock with many steps queued
    return state, losses, metrics


def test_small_config_overfits_a_few_episodes(run):
    _, _, dataset, _ = run
    _, losses, metrics = train_on_one_batch(tiny_config(steps=150, learning_rate=3e-3, warmup_steps=10), dataset)
    assert losses[-1] < 0.1 * losses[0]
    assert float(metrics["accuracy"]) > 0.95


def test_bfloat16_activations_train_float32_parameters(run):
    """The GPU/TPU precision (configs/paper.py): bfloat16 through every pathway, hand-written LayerNorm
    backward included, while the parameters and optimiser state stay float32."""
    _, _, dataset, _ = run
    config = tiny_config(steps=30, learning_rate=3e-3, warmup_steps=5)
    config.model.dtype = "bfloat16"
    state, losses, _ = train_on_one_batch(config, dataset)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


def test_sharded_step_matches_single_device(run):
    """Same batches on 1 and on 8 devices give the same updates. Plain SGD, because Adam divides
    near-zero gradients by their own magnitude and so turns float rounding into visible differences."""
    config, _, dataset, _ = run
    assert jax.device_count() == 8
    model = build_agent(config, dataset)
    batches = WindowBatches(dataset, 8, model.context, seed=3, windows_per_row=2)
    params = jax.device_get(init_params(model, config.seed))  # host copy: each step donates its state
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = make_mesh(devices)
        state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        step = make_train_step(model, mesh, config.seed)
        for position in range(3):
            state, metrics = step(state, shard_batch(batches.batch_at(position), mesh))
        assert len(state.params["head"]["kernel"].sharding.device_set) == len(devices)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    chex.assert_trees_all_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(results[0][1], results[1][1], rtol=1e-5)


def test_resume_after_a_kill_is_exact(run, tmp_path, monkeypatch):
    """Killed at step 17 (last checkpoint at 10, evaluations and snapshots at 5, 10, 15), then run again: the
    same parameters as an uninterrupted run, every metrics and evaluation row once, and the snapshots of the
    uninterrupted run (which records every 10 steps: recording more often does not change training)."""
    _, workdir, _, _ = run
    straight = restore_agent(workdir)
    config = tiny_config(eval_every=5, snapshot_every=5)  # evaluating, recording do not touch the parameters
    (tmp_path / "demos").symlink_to(workdir / "demos")
    real_next = WindowBatches.__next__

    def killed_at_17(self):
        if self.position == 17:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(WindowBatches, "__next__", killed_at_17)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config, tmp_path, progress=False)
    monkeypatch.setattr(WindowBatches, "__next__", real_next)
    assert restore_agent(tmp_path).step == 10
    assert (tmp_path / "eval" / "step_00000015.json").exists()
    assert list(load_snapshots(tmp_path)) == [0, 5, 10, 15]  # 15: past the checkpoint, written again on resume
    train_and_evaluate(config, tmp_path, progress=False)
    resumed = restore_agent(tmp_path)
    assert resumed.step == straight.step == config.train.steps
    chex.assert_trees_all_equal(resumed.params, straight.params)
    rows = (tmp_path / "metrics" / "train.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [5, 10, 15, 20]  # nothing logged twice
    rows = (tmp_path / "eval" / "eval.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [[str(s), *config.data.levels] for s in (5, 10, 15, 20)]
    resumed_snapshots, straight_snapshots = load_snapshots(tmp_path), load_snapshots(workdir)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [  # one file a step, no temporaries
        f"action_step_{s:08d}.npz" for s in (0, 5, 10, 15, 20)]
    for step in straight_snapshots:
        np.testing.assert_array_equal(resumed_snapshots[step].embeddings, straight_snapshots[step].embeddings)


def test_checkpoint_of_another_config_is_refused(run, tmp_path):
    config, workdir, _, _ = run
    (tmp_path / "demos").symlink_to(workdir / "demos")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "config.json").write_text((workdir / "checkpoints" / "config.json").read_text())
    other = tiny_config()
    other.model.width = 64
    with pytest.raises(LvaaError, match="another config.*model.width: 32 vs 64"):
        train_and_evaluate(other, tmp_path, progress=False)


def test_checkpoint_of_another_code_version_is_refused(run, tmp_path, monkeypatch):
    _, workdir, _, _ = run
    for name in ("demos", "checkpoints"):
        (tmp_path / name).symlink_to(workdir / name)
    built = Agent.from_config  # the same config, but a model with another parameter tree
    monkeypatch.setattr(Agent, "from_config", lambda *args: built(*args).clone(memory_layers=2))
    with pytest.raises(LvaaError, match="checkpoint at step 20 does not fit this model"):
        restore_agent(tmp_path)


def test_workdir_without_demos_is_refused(tmp_path):
    with pytest.raises(LvaaError, match="no demo dataset"):
        train_and_evaluate(tiny_config(), tmp_path, progress=False)


def test_batch_must_split_over_devices(run, tmp_path):
    config, workdir, _, _ = run
    (tmp_path / "demos").symlink_to(workdir / "demos")
    with pytest.raises(LvaaError, match="multiple of the 8 devices"):
        train_and_evaluate(tiny_config(batch_size=12), tmp_path, progress=False)


def test_a_bad_setting_leaves_the_workdir_usable(run, tmp_path):
    """A typo'd value fails before the checkpoint folder records the config, so the corrected command runs."""
    config, workdir, _, _ = run
    (tmp_path / "demos").symlink_to(workdir / "demos")
    with pytest.raises(LvaaError, match=r"config.train.windows_per_row=0: must be a positive integer"):
        train_and_evaluate(tiny_config(windows_per_row=0), tmp_path, progress=False)
    bad_pooling = tiny_config()
    bad_pooling.model.pooling = "avg"
    with pytest.raises(LvaaError, match="unknown pooling 'avg'"):
        train_and_evaluate(bad_pooling, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("steps", [1, 5, 6, 40])
def test_schedule_of_runs_shorter_than_their_warmup(steps):
    train = tiny_config(steps=steps, warmup_steps=5, learning_rate=1e-3).train
    tx = make_optimizer(train)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        assert np.isfinite(np.asarray(updates["w"])).all()


def test_outputs_of_a_run(run):
    config, workdir, _, evaluation = run
    assert set(evaluation["levels"]) == set(config.data.levels)
    saved = json.loads((workdir / "eval" / f"step_{config.train.steps:08d}.json").read_text())
    assert saved["levels"] == evaluation["levels"]
    assert list((workdir / "metrics").glob("events.out.tfevents.*"))
    header = (workdir / "metrics" / "train.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "accuracy", "grad_norm", "steps_per_s"} == set(header)


def test_restored_agent_acts_in_the_env(run):
    _, workdir, dataset, _ = run
    agent = restore_agent(workdir)
    result = evaluate(agent.model, agent.params, agent.tokenizer, dataset.levels, 3, seed=1, max_steps=20,
                      progress=False)
    level = result["levels"][dataset.levels[0]]
    assert level["episodes"] == 3 and 0 <= level["success_rate"] <= 1 and 1 <= level["mean_length"] <= 20
    untrained = restore_agent(workdir, trained=False)
    assert untrained.step == 0
    embeddings = agent.embed(list(dataset.missions))
    chex.assert_shape(embeddings, (agent.model.instruction_layers + 1, len(dataset.missions), agent.model.width))
    assert not np.allclose(embeddings, untrained.embed(list(dataset.missions)))


def test_closed_loop_step_equals_the_training_forward(run):
    """Evaluation's cached, one-step-at-a-time forward gives the logits of the full-window forward."""
    _, workdir, dataset, _ = run
    agent = restore_agent(workdir)
    model, params = agent.model, agent.params
    episode = int(np.argmax(dataset.length))
    batch = WindowBatches(dataset, 1, model.context, seed=0).windows(np.array([episode]), np.array([0]))
    expected = np.asarray(jax.jit(model.apply)({"params": params}, batch)).argmax(-1)[0]
    z = instruction_embedding(params, batch["tokens"][:, 0], batch["token_mask"][:, 0], model=model)
    memory = jnp.zeros((1, model.context, model.width))
    for t in range(int(batch["mask"].sum())):
        memory, action = _observe_and_act(
            model, params, memory, z, np.array([0]), np.array([t]), batch["image"][:, t], batch["direction"][:, t]
        )
        assert int(action[0]) == expected[t]


def test_snapshots_of_the_action_space_at_step_0_every_snapshot_step_and_the_last(run):
    config, workdir, _, _ = run
    assert config.train.snapshot_every == config.train.checkpoint_every == 10
    snapshots = load_snapshots(workdir)
    assert list(snapshots) == [0, 10, 20]
    instructions = instruction_set(config, workdir)
    for step, table in snapshots.items():
        assert table.meta["step"] == step and table.instructions == tuple(instructions)
    # What the embedding stage computes for `untrained_agent` and `action`, bit for bit.
    np.testing.assert_array_equal(snapshots[0].embeddings, restore_agent(workdir, trained=False).embed(instructions))
    np.testing.assert_array_equal(snapshots[20].embeddings, restore_agent(workdir).embed(instructions))
    assert not np.array_equal(snapshots[10].embeddings, snapshots[20].embeddings)


def test_snapshots_follow_the_length_of_training():
    config = get_config()
    assert config.train.snapshot_every == config.train.steps // 10 == 300  # 11 points, steps 0 to 3000
    config.train.steps = 20000
    assert config.train.snapshot_every == 2000


def test_a_damaged_snapshot_is_a_one_line_error_naming_it(run, tmp_path):
    (tmp_path / "snapshots").mkdir()
    for step in (0, 10):
        (tmp_path / "snapshots" / f"action_step_{step:08d}.npz").symlink_to(snapshot_path(run[1], step))
    (tmp_path / "snapshots" / "action_step_00000020.npz").write_bytes(snapshot_path(run[1], 20).read_bytes()[:100])
    with pytest.raises(LvaaError, match=r"action_step_00000020.npz: not an embedding table .*; delete this snapshot "
                                        r"to score the others \(the curve then lacks step 20\)$"):
        load_snapshots(tmp_path)


def test_a_run_killed_between_checkpoint_and_snapshot_ends_with_the_same_snapshots(run, tmp_path, monkeypatch):
    config, workdir, _, _ = run
    (tmp_path / "demos").symlink_to(workdir / "demos")
    real_record = SnapshotRecorder.record_if_due

    def killed_at_10(self, step, params):
        if step == 10:  # the checkpoint at 10 is saved, its snapshot not yet
            raise KeyboardInterrupt
        real_record(self, step, params)

    monkeypatch.setattr(SnapshotRecorder, "record_if_due", killed_at_10)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config, tmp_path, progress=False)
    assert list(load_snapshots(tmp_path)) == [0]
    monkeypatch.setattr(SnapshotRecorder, "record_if_due", real_record)
    train_and_evaluate(config, tmp_path, progress=False)
    straight, resumed = load_snapshots(workdir), load_snapshots(tmp_path)
    assert list(resumed) == list(straight) == [0, 10, 20]
    for step in straight:
        np.testing.assert_array_equal(resumed[step].embeddings, straight[step].embeddings)


def test_snapshot_every_must_be_a_non_negative_integer(run, tmp_path):
    (tmp_path / "demos").symlink_to(run[1] / "demos")
    with pytest.raises(LvaaError, match=r"config.train.snapshot_every=-1: must be an integer >= 0"):
        train_and_evaluate(tiny_config(snapshot_every=-1), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()  # the corrected command can still use this folder
    config = tiny_config()
    del config.train["snapshot_every"]  # a config written before snapshots existed
    with pytest.raises(LvaaError, match=r"config.train.snapshot_every=None: must be an integer >= 0"):
        train_and_evaluate(config, tmp_path, progress=False)
