"""Faults a user meets outside the alignment stage: damaged checkpoints, two runs on one folder, settings
out of bounds, a read-only or full disk, a killed generation. Each one works, or ends as one `error:` line
(exit 2) naming the file or setting; nothing is lost or written twice."""

import errno
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import pytest
from script_runs import ROOT, run_script, user_error
from tiny_runs import tiny_config

from configs import paper
from configs.default import get_config
from lvaa_jax import files
from lvaa_jax.agent import restore_agent, train_and_evaluate
from lvaa_jax.agent.checkpoint import DAMAGED, FILES, damage, open_manager, restore_newest
from lvaa_jax.agent.checkpoint import storage_error as tensorstore_error
from lvaa_jax.agent.train import build_agent, check_settings, create_state, make_mesh
from lvaa_jax.babyai import load_demos, make_demos
from lvaa_jax.babyai.generate import demo_settings
from lvaa_jax.cli import storage_error
from lvaa_jax.embeddings import embed_instructions
from lvaa_jax.embeddings.stage import check_embed_settings
from lvaa_jax.errors import LvaaError
from lvaa_jax.pipeline import run_pipeline
from lvaa_jax.runlock import LOCK_FILE, hold_run_folder


def copy_run(workdir: Path, to: Path) -> None:
    """A copy of a run folder to damage: its checkpoints and evaluations copied, its demos linked."""
    (to / "demos").symlink_to(workdir / "demos")
    for name in ("checkpoints", "eval"):
        shutil.copytree(workdir / name, to / name)


def largest(folder: Path, pattern: str) -> Path:
    return max(folder.glob(pattern), key=lambda p: p.stat().st_size)


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize(("pattern", "harm"), [
    ("state/ocdbt.process_0/d/*", cut_short),  # a data file of the parameters
    ("state/ocdbt.process_0/d/*", flip_a_byte),
    ("state/ocdbt.process_0/d/*", Path.unlink),
    ("state/d/*", cut_short),
    ("state/manifest.ocdbt", cut_short),
    ("state/ocdbt.process_0/manifest.ocdbt", Path.unlink),
    ("_CHECKPOINT_METADATA", cut_short),
    ("state/_METADATA", cut_short),
    ("state/_METADATA", Path.unlink),
    ("data/metadata", cut_short),  # the data iterator's position (a JSON item)
    ("data/metadata", Path.unlink),
], ids=lambda v: getattr(v, "__name__", v))
def test_each_kind_of_damage_is_found_by_file(trained_run, tmp_path, pattern, harm):
    _, workdir, _, _ = trained_run
    step = tmp_path / "20"
    shutil.copytree(workdir / "checkpoints" / "20", step)
    assert damage(step) is None
    target = largest(step, pattern)
    harm(target)
    assert damage(step).startswith(str(target))


def test_training_resumes_exactly_from_the_newest_intact_checkpoint(trained_run, tmp_path, caplog):
    """The final checkpoint of a finished run is damaged: training runs again from step 10, moves the
    damaged one aside, and ends with the parameters and evaluation of the uninterrupted run."""
    config, workdir, _, evaluation = trained_run
    copy_run(workdir, tmp_path)
    target = largest(tmp_path / "checkpoints" / "20", "state/ocdbt.process_0/d/*")
    cut_short(target)
    with caplog.at_level(logging.WARNING, "lvaa_jax"):
        again = train_and_evaluate(config, tmp_path, progress=False)
    assert f"the checkpoint at step 20 is damaged ({target} has" in caplog.text
    assert "delete" not in caplog.text
    assert (tmp_path / "checkpoints" / DAMAGED / "20").is_dir()
    chex.assert_trees_all_equal(restore_agent(tmp_path).params, restore_agent(workdir).params)
    assert again == evaluation


def test_a_checkpoint_orbax_cannot_read_is_skipped_without_its_record(trained_run, tmp_path, caplog):
    """No files.json (a run killed between orbax's commit and the record): orbax's own failure is the sign."""
    config, workdir, dataset, _ = trained_run
    copy_run(workdir, tmp_path)
    (tmp_path / "checkpoints" / "20" / FILES).unlink()
    cut_short(tmp_path / "checkpoints" / "20" / "state" / "manifest.ocdbt")
    state = create_state(build_agent(config, dataset), config, make_mesh())
    with caplog.at_level(logging.WARNING, "lvaa_jax"), open_manager(tmp_path / "checkpoints") as manager:
        step, restored, damaged = restore_newest(manager, state, with_data=True)
    assert (step, restored["data"], damaged) == (10, {"position": 10}, [20])
    assert "the checkpoint at step 20 is damaged (orbax could not read it" in caplog.text


def test_embedding_refuses_a_damaged_newest_checkpoint(trained_run, tmp_path):
    """Embedding an older agent would put it under the run's name: training restores the newest first."""
    _, workdir, _, _ = trained_run
    copy_run(workdir, tmp_path)
    cut_short(tmp_path / "checkpoints" / "20" / "state" / "_METADATA")
    with pytest.raises(LvaaError, match=r"the newest checkpoint \(step 20\) is damaged \(see the warning above\); "
                                        "run scripts/train.py with this run's config again: it trains from step 10"):
        restore_agent(tmp_path)
    assert restore_agent(tmp_path, step=10).step == 10


def test_no_intact_checkpoint_is_one_line(trained_run, tmp_path):
    _, workdir, _, _ = trained_run
    copy_run(workdir, tmp_path)
    for step in ("10", "20"):
        cut_short(tmp_path / "checkpoints" / step / "data" / "metadata")
    with pytest.raises(LvaaError, match=r"no checkpoint can be restored \(step 20: .*data/metadata has 8 bytes, "
                                        r"16 were written; step 10: .*\); train again in another --workdir"):
        restore_agent(tmp_path)
    with pytest.raises(LvaaError, match=r"no checkpoint can be restored \(step 10: "):
        restore_agent(tmp_path, step=10)


# ---------------------------------------------------------------------------------------------------------
# Two runs on one run folder

HOLD = ("import sys, time; from lvaa_jax.runlock import hold_run_folder\n"
        "with hold_run_folder(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path/run``, as a running stage would."""
    workdir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    yield workdir, process
    process.kill()
    process.wait()


def test_a_second_run_on_a_folder_is_refused_naming_the_holder(holder, trained_run):
    workdir, process = holder
    config = trained_run[0]
    for stage in (make_demos, train_and_evaluate, embed_instructions, run_pipeline):
        with pytest.raises(LvaaError, match=f"{workdir} is in use by pid {process.pid} on "):
            stage(config, workdir, progress=False)
    for script in ("train.py", "align.py"):
        line = user_error(run_script(script, "--config=configs/default.py:tiny", f"--workdir={workdir}"))
        assert re.fullmatch(rf"error: {workdir} is in use by pid {process.pid} on \S+ since \S+ \(-c {workdir}\); "
                            r"wait for that run to end \(or stop it\), or use another --workdir", line), line
    assert sorted(p.name for p in workdir.iterdir()) == [LOCK_FILE]  # nothing else was written


def test_the_folder_of_a_killed_run_is_taken_over(holder, caplog):
    workdir, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    with caplog.at_level(logging.WARNING, "lvaa_jax"), hold_run_folder(workdir), hold_run_folder(workdir):
        assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == os.getpid()  # re-entrant
    assert f"the previous run (pid {process.pid} on" in caplog.text and "taking it over" in caplog.text
    assert (workdir / LOCK_FILE).read_text() == ""  # a run that ends leaves no holder behind


def test_stale_temporary_shards_go_even_when_the_demos_are_complete(trained_run, tmp_path):
    config, workdir, _, _ = trained_run
    shutil.copytree(workdir / "demos", tmp_path / "demos")
    (tmp_path / "demos" / "shard_00007.tmp").mkdir()
    (tmp_path / "demos" / "shard_00007.tmp" / "image.npy").write_bytes(b"partial")
    (tmp_path / "demos" / "manifest.json.tmp").write_text("{")
    make_demos(config, tmp_path, progress=False)
    assert not list((tmp_path / "demos").glob("*.tmp"))


def test_a_damaged_demo_manifest_is_one_line_and_rebuilt(trained_run, tmp_path):
    config, workdir, _, _ = trained_run
    shutil.copytree(workdir / "demos", tmp_path / "demos")
    manifest = tmp_path / "demos" / "manifest.json"
    cut_short(manifest)
    with pytest.raises(LvaaError, match=f"{manifest}: not valid JSON, cut short or altered .*; delete it and run "
                                        "make_demos again: it rebuilds it from the finished shards"):
        load_demos(tmp_path / "demos")
    manifest.unlink()
    make_demos(config, tmp_path, progress=False)
    assert manifest.read_bytes() == (workdir / "demos" / "manifest.json").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# Settings

CHECKS = (demo_settings, check_settings, check_embed_settings)  # data, model/train/eval, embed
OUT_OF_BOUNDS = [
    ("seed", -1), ("data.episodes_per_level", 0), ("data.episodes_per_shard", 0), ("data.num_workers", -1),
    ("data.census_resets", -1),
    ("model.width", 0), ("model.cell_width", -16), ("model.num_heads", 0), ("model.instruction_layers", -1),
    ("model.memory_layers", -1), ("model.mlp_ratio", 0), ("model.context", 0), ("model.dropout", 1.0),
    ("model.dropout", -0.1),
    ("train.steps", -5), ("train.steps", 0), ("train.batch_size", 0), ("train.windows_per_row", 0),
    ("train.learning_rate", -1.0), ("train.learning_rate", 0.0), ("train.learning_rate", float("nan")),
    ("train.learning_rate", float("inf")), ("train.warmup_steps", -1), ("train.weight_decay", -1e-4),
    ("train.grad_clip", 0.0), ("train.log_every", 0), ("train.checkpoint_every", 0),
    ("train.keep_checkpoints", 0), ("train.eval_every", -1), ("train.snapshot_every", -1),
    ("eval.episodes_per_level", 0), ("eval.max_steps", -1),
    ("embed.batch_size", 0), ("embed.random_dim", -1),
]


@pytest.mark.parametrize("config", [get_config(), get_config("tiny"), paper.get_config(), paper.get_config("offline")],
                         ids=["default", "tiny", "paper", "paper:offline"])
def test_the_shipped_configs_are_within_bounds(config):
    for check in CHECKS:
        check(config)


@pytest.mark.parametrize(("setting", "value"), OUT_OF_BOUNDS, ids=lambda v: str(v))
def test_each_numeric_setting_is_checked_against_its_bound(setting, value):
    config = get_config()
    section, _, key = setting.rpartition(".")
    (config[section] if section else config)[key] = value
    with pytest.raises(LvaaError, match=re.escape(f"config.{setting}={value!r}: must be ")):
        for check in CHECKS:
            check(config)


def test_a_bad_setting_fails_before_anything_is_written(tmp_path):
    with pytest.raises(LvaaError, match=r"config.train.steps=-5: must be a positive integer"):
        train_and_evaluate(tiny_config(steps=-5), tmp_path / "run", progress=False)
    result = run_script("run_pipeline.py", "--config=configs/default.py:tiny", f"--workdir={tmp_path / 'run'}",
                        "--config.train.learning_rate=-1")
    assert user_error(result) == "error: config.train.learning_rate=-1.0: must be a finite number > 0"
    assert not (tmp_path / "run").exists()


def test_training_on_demos_of_other_settings_is_refused(trained_run, tmp_path):
    _, workdir, _, _ = trained_run
    (tmp_path / "demos").symlink_to(workdir / "demos")
    other = tiny_config()
    other.data.episodes_per_level = 40
    with pytest.raises(LvaaError, match=r"holds demos made with config.data.episodes_per_level=24, not 40; use "
                                        "the settings the demos were made with"):
        train_and_evaluate(other, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------
# The file system. Tests run as root here, which file modes do not stop, so a read-only or full disk is a
# real tmpfs mounted read-only or small in a private mount namespace (`unshare`); where the system allows
# no namespace, the in-process tests below still cover the error path with a simulated failed write.


def can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs unshare with user and mount namespaces")


def run_on_tmpfs(options: str, mount: Path, script: str, *flags: str, before: str = "true"):
    """``scripts/<script>`` with a tmpfs mounted at ``mount`` (``mount -o options``), seen by it alone."""
    mount.mkdir(exist_ok=True)
    command = (f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount))} && {before} && exec "
               + shlex.join([sys.executable, f"scripts/{script}", *flags]))
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@needs_mount
def test_a_read_only_workdir_is_one_line(tmp_path):
    mount = tmp_path / "mnt"
    result = run_on_tmpfs("ro", mount, "make_demos.py", "--config=configs/default.py:tiny", f"--workdir={mount}/run")
    assert user_error(result) == (f"error: {mount}/run: Read-only file system; the file system is read-only: "
                                  "choose a --workdir (or --out) on a writable one")


@needs_mount
@pytest.mark.parametrize(("script", "size"), [("make_demos.py", "20k"), ("train.py", "300k")])
def test_a_full_disk_is_one_line(trained_run, tmp_path, script, size):
    """Demos: numpy's write; training: the checkpoint, written by orbax and tensorstore."""
    _, workdir, _, _ = trained_run
    mount = tmp_path / "mnt"
    copy = f"cp -r {shlex.quote(str(workdir / 'demos'))} {shlex.quote(str(mount))}/"
    result = run_on_tmpfs(f"size={size}", mount, script, "--config=configs/default.py:tiny",
                          "--config.data.episodes_per_level=24", f"--workdir={mount}",
                          before=copy if script == "train.py" else "true")
    line = user_error(result)
    assert re.fullmatch(rf"error: {mount}/\S+: No space left on device; free space on that disk, or choose a "
                        r"--workdir on another; then run the same command again", line), line


def test_a_failed_write_names_its_file(trained_run, tmp_path, monkeypatch):
    """A full disk simulated in-process: the first write of the demos fails as ``write()`` does, with no
    file name; the error that reaches the entry point names the file."""
    config, _, _, _ = trained_run

    class FullDisk:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "open", FullDisk, raising=False)
    with pytest.raises(OSError) as raised:
        make_demos(config, tmp_path, progress=False)
    assert storage_error(raised.value) == (
        f"{tmp_path}/demos/settings.json.tmp: No space left on device; free space on that disk, or choose a "
        "--workdir on another; then run the same command again")


def test_the_entry_point_reports_the_first_failed_write(tmp_path):
    """Closing files after a failed write fails again, without a file name: the first failure is named."""
    program = ("import errno, os\nfrom lvaa_jax import cli\n"
               "def main(argv):\n"
               "    try:\n"
               "        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), '/runs/x/metrics/train.csv')\n"
               "    finally:\n"
               "        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))\n"
               "cli.run(main)\n")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert user_error(result) == ("error: /runs/x/metrics/train.csv: Disk quota exceeded; free space within your "
                                  "quota, or choose a --workdir on another disk; then run the same command again")


def test_a_tensorstore_write_failure_becomes_its_os_error():
    error = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/runs/x/checkpoints/10.orbax-checkpoint-tmp/'
                       'state/_sharding": Failed to write 36916 bytes to file 12: No space left on device '
                       "[os_error_code='28']")
    converted = tensorstore_error(error, Path("/runs/x/checkpoints"))
    assert (converted.errno, converted.filename) == (errno.ENOSPC, "/runs/x/checkpoints/10.orbax-checkpoint-tmp/"
                                                                   "state/_sharding")
    assert tensorstore_error(ValueError("shape mismatch"), Path("/runs/x")) is None


# ---------------------------------------------------------------------------------------------------------
# A killed generation


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_with_a_killed_generation(tmp_path):
    """SIGKILL gives make_demos no chance to stop its pool: its workers and the resource tracker must go
    by themselves."""
    process = subprocess.Popen(
        [sys.executable, "scripts/make_demos.py", "--config=configs/default.py:tiny", f"--workdir={tmp_path}",
         "--config.data.num_workers=2", "--config.data.episodes_per_level=5000", "--config.data.episodes_per_shard=50"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (tmp_path / "demos" / "shard_00000").exists():  # mid-generation
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    spawned = children(process.pid)
    assert len(spawned) == 3, spawned  # two workers and the resource tracker
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in spawned) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in spawned if alive(pid)]
