"""Stage 1: demo generation, format, loader checks, tokenizer and the window batch iterator."""

import json
from pathlib import Path

import chex
import numpy as np
import pytest
from script_runs import run_script, user_error

from configs.default import get_config
from lvaa_jax.babyai import Tokenizer, WindowBatches, load_demos, make_demos, make_env
from lvaa_jax.babyai.batches import pack_rows
from lvaa_jax.cli import storage_error
from lvaa_jax.errors import LvaaError

LEVELS = ("BabyAI-GoToLocal-v0", "BabyAI-OpenDoorColor-v0")


def small_config(**data):
    config = get_config("tiny")
    config.data.levels = LEVELS
    config.data.episodes_per_level = 12
    config.data.episodes_per_shard = 8
    config.data.num_workers = 0
    config.data.census_resets = 50
    config.data.update(data)
    return config


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    return make_demos(small_config(), workdir, progress=False)


def test_summary_and_manifest(demos):
    manifest = demos.manifest
    assert manifest["levels"] == list(LEVELS)
    assert demos.num_episodes == sum(c["episodes"] for c in manifest["counts"].values())
    assert demos.num_episodes + sum(c["failures"] for c in manifest["counts"].values()) == 24
    assert len(manifest["shards"]) == 3
    assert set(demos.seen_missions()) <= set(demos.missions)


def test_same_config_gives_identical_bytes(demos, tmp_path):
    # Two worker processes this time: the bytes must not depend on scheduling.
    again = make_demos(small_config(num_workers=2), tmp_path, progress=False)
    first, second = tree_bytes(demos.path), tree_bytes(again.path)
    first.pop("settings.json"), second.pop("settings.json")  # records num_workers-free settings anyway
    assert first == second


def test_resume_finishes_only_missing_shards(demos, tmp_path):
    config = small_config()
    make_demos(config, tmp_path, progress=False)
    out = tmp_path / "demos"
    # Simulate a kill mid-run: no manifest, one shard missing, one half-written temporary shard.
    (out / "manifest.json").unlink()
    kept = (out / "shard_00000" / "image.npy").stat().st_mtime_ns
    for name in ("shard_00002",):
        for f in (out / name).iterdir():
            f.unlink()
        (out / name).rmdir()
    (out / "shard_00001.tmp").mkdir()
    (out / "shard_00001.tmp" / "image.npy").write_bytes(b"partial")
    with pytest.raises(LvaaError, match="interrupted"):
        load_demos(out)
    make_demos(config, tmp_path, progress=False)
    assert (out / "shard_00000" / "image.npy").stat().st_mtime_ns == kept
    assert tree_bytes(out) == tree_bytes(demos.path)  # the stale temporary shard is gone too


def test_altered_and_truncated_shards_are_refused(demos, tmp_path):
    make_demos(small_config(), tmp_path, progress=False)
    image = tmp_path / "demos" / "shard_00001" / "image.npy"
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF
    image.write_bytes(bytes(data))
    with pytest.raises(LvaaError, match="sha256 differs"):
        load_demos(tmp_path / "demos")
    image.write_bytes(bytes(data[:-10]))
    with pytest.raises(LvaaError, match="truncated"):
        load_demos(tmp_path / "demos", verify=False)


def test_other_format_version_is_refused(demos, tmp_path):
    make_demos(small_config(), tmp_path, progress=False)
    manifest = tmp_path / "demos" / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"format_version": 99}))
    with pytest.raises(LvaaError, match="format version 99"):
        load_demos(tmp_path / "demos")


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(LvaaError, match="unknown BabyAI level 'BabyAI-GoToLocl-v0'.*GoToLocal"):
        make_demos(small_config(levels=("BabyAI-GoToLocl-v0",)), tmp_path, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError) as raised:  # the entry points print it as one line
        make_demos(small_config(), blocker / "run", progress=False)
    assert "a part of that path is a file" in storage_error(raised.value)
    make_demos(small_config(episodes_per_level=2), tmp_path / "run", progress=False)
    with pytest.raises(LvaaError, match="episodes_per_level differ"):
        make_demos(small_config(episodes_per_level=3), tmp_path / "run", progress=False)


def test_tokenizer_round_trips_every_mission(demos, tmp_path):
    tokenizer = demos.tokenizer
    for mission in demos.missions:
        assert tokenizer.decode(tokenizer.encode(mission)) == mission
        assert 1 not in tokenizer.encode(mission)
    seq = "go to the red ball, then open a door"
    assert Tokenizer.from_missions([seq]).decode(Tokenizer.from_missions([seq]).encode(seq)) == seq
    tokenizer.save(tmp_path / "vocab.json")
    assert Tokenizer.load(tmp_path / "vocab.json").vocabulary == tokenizer.vocabulary


@pytest.mark.parametrize("windows_per_row", [1, 3])
def test_window_batches_shapes_masks_and_positions(demos, windows_per_row):
    batches = WindowBatches(demos, batch_size=4, context=6, seed=7, windows_per_row=windows_per_row)
    batch = next(batches)
    length = demos.max_instruction_length
    chex.assert_shape(batch["image"], (4, 6, 7, 7, 3))
    chex.assert_shape([batch["direction"], batch["action"], batch["mask"], batch["segment"], batch["position"]], (4, 6))
    chex.assert_shape([batch["tokens"], batch["token_mask"]], (4, windows_per_row, length))
    chex.assert_shape(batch["level_id"], (4, windows_per_row))
    assert batch["image"].dtype == np.uint8 and batch["mask"].dtype == bool
    assert batch["mask"][:, 0].all()  # a row starts on a real step
    assert not batch["action"][~batch["mask"]].any() and not batch["image"][~batch["mask"]].any()
    np.testing.assert_array_equal(batch["token_mask"], batch["tokens"] != 0)
    # Windows lie end to end, each counting its steps from 0; padding follows the last window.
    starts = np.diff(batch["segment"], axis=1, prepend=-1) > 0
    np.testing.assert_array_equal(batch["position"] == 0, starts)
    assert (np.diff(batch["mask"].astype(int), axis=1) <= 0).all()
    used = batch["token_mask"].any(-1)
    np.testing.assert_array_equal(used, batch["level_id"] >= 0)
    np.testing.assert_array_equal(used.sum(1), batch["segment"].max(1) + 1)
    # Resuming from a saved position serves exactly the batches an uninterrupted iterator would.
    state = batches.state()
    expected = [next(batches) for _ in range(3)]
    restored = WindowBatches(demos, batch_size=4, context=6, seed=7, windows_per_row=windows_per_row)
    restored.restore(state)
    for want in expected:
        chex.assert_trees_all_equal(next(restored), want)
    other_seed = WindowBatches(demos, batch_size=4, context=6, seed=8, windows_per_row=windows_per_row).batch_at(0)
    assert not all(np.array_equal(other_seed[k], batch[k]) for k in batch)


@pytest.mark.parametrize("windows_per_row", [1, 3])
def test_an_epoch_covers_every_step_once(demos, windows_per_row):
    batches = WindowBatches(demos, batch_size=1, context=8, seed=0, windows_per_row=windows_per_row)
    served = [batches.batch_at(i) for i in range(batches.batches_per_epoch)]
    assert sum(int(b["mask"].sum()) for b in served) == int(demos.length.sum())
    actions = np.sort(np.concatenate([b["action"][b["mask"]] for b in served]))
    all_actions = np.sort(np.concatenate([demos.episode(i)["action"] for i in range(demos.num_episodes)]))
    np.testing.assert_array_equal(actions, all_actions)


def test_window_contents_match_the_episode(demos):
    batches = WindowBatches(demos, batch_size=2, context=4, seed=0)
    episode = int(np.argmax(demos.length))
    batch = batches.windows(np.array([episode, episode]), np.array([0, 4]))
    full = demos.episode(episode)
    for row, offset in enumerate((0, 4)):
        real = batch["mask"][row]
        np.testing.assert_array_equal(batch["image"][row][real], full["image"][offset : offset + 4])
        np.testing.assert_array_equal(batch["action"][row][real], full["action"][offset : offset + 4])
    assert demos.tokenizer.decode(batch["tokens"][0, 0]) == full["mission"]


def test_packing_fills_rows_within_their_limits():
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(1, 17, 500))[::-1]
    row, slot = pack_rows(lengths, capacity=16, max_windows=3)
    used = np.bincount(row, weights=lengths)
    assert used.max() <= 16 and np.bincount(row).max() <= 3 and (slot < 3).all()
    assert len(set(zip(row.tolist(), slot.tolist(), strict=True))) == len(lengths)  # one window per slot
    assert lengths.sum() / (16 * len(used)) > 0.9  # best fit leaves little padding
    np.testing.assert_array_equal(pack_rows(lengths, 16, 1)[0], np.arange(500))  # one window per row


def test_replayed_episodes_reach_the_goal(demos):
    """The arrays are true trajectories: the same seeded env, driven by the stored actions, succeeds."""
    for index in range(demos.num_episodes):
        episode = demos.episode(index)
        env = make_env(episode["level"])
        obs, _ = env.reset(seed=episode["seed"])
        assert obs["mission"] == episode["mission"]
        for step, action in enumerate(episode["action"]):
            np.testing.assert_array_equal(obs["image"], episode["image"][step])
            assert obs["direction"] == episode["direction"][step]
            obs, reward, terminated, truncated, _ = env.step(int(action))
        assert terminated and reward > 0


def test_script_reports_bad_level_on_one_line(tmp_path):
    result = run_script("make_demos.py", "--config=configs/default.py:tiny", f"--workdir={tmp_path}",
                        "--config.data.levels=('BabyAI-Nope-v0',)")
    assert user_error(result).startswith("error: config.data.levels: unknown BabyAI level")
