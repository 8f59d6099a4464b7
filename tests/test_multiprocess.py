"""A job of two cooperating processes (jax.distributed), each with 4 CPU devices reducing through gloo, on
the tiny config, against one process of 8 devices (this test session): the same losses at every logged
step, the same report, each artifact written once; killed and started again, the parameters of the run
that was not; the neighbour search over the mesh of both processes equals the one of a single process;
one process's error ends both with the same line. docs/distributed.md describes the job.

Every process gets a timeout: a collective that hangs fails the test, not CI.
"""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest
from multiprocess_worker import KNN_CASES, knn_input
from script_runs import run_script, user_error
from tiny_runs import tiny_config

from lvaa_jax import distributed
from lvaa_jax.agent import restore_agent
from lvaa_jax.alignment import nearest_neighbours
from lvaa_jax.errors import LvaaError
from lvaa_jax.pipeline import run_pipeline
from lvaa_jax.runlock import LOCK_FILE, hold_run_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config=configs/default.py:tiny", "--config.data.num_workers=0", "--config.data.episodes_per_level=24",
        "--config.eval.episodes_per_level=2"]  # tiny_runs.tiny_config, the config of the `trained_run` fixture
PROCESSES = 2
TIMEOUT = 600  # seconds for a job: a few minutes on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_job(script: str, *flags: str, workdirs: list[Path] | None = None) -> list[subprocess.Popen]:
    """The processes of one job (``workdirs``: each process's --workdir, when flags hold none). Without
    JAX's persistent compilation cache: on CPU it serves process 0 alone, which would then reach each
    collective program's first run while the other still compiles it, and gloo waits 30 s at most there
    (docs/distributed.md)."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return [
        subprocess.Popen(
            [sys.executable, script, *flags, *([f"--workdir={workdirs[i]}"] if workdirs else []), "--distributed",
             f"--coordinator_address=localhost:{port}", f"--num_processes={PROCESSES}", f"--process_id={i}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for i in range(PROCESSES)
    ]


def finish(job: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    deadline = time.monotonic() + timeout
    done = []
    for process in job:
        try:
            out, err = process.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not end within {timeout} s (a collective hung?)\n{kill(job)}")
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return done


def kill(job: list[subprocess.Popen]) -> str:
    """SIGKILL for every process of the job (and its children); returns the end of each one's stderr."""
    for process in job:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    ends = [process.communicate()[1] for process in job]
    return "\n".join(f"process {i} (exit code {process.returncode}):\n{end[-2000:]}"
                     for i, (process, end) in enumerate(zip(job, ends, strict=True)))


def succeeded(done: list[subprocess.CompletedProcess]) -> None:
    for i, process in enumerate(done):
        assert process.returncode == 0, f"process {i}:\n{process.stderr[-3000:]}"


def train_rows(workdir: Path) -> list[dict[str, str]]:
    """metrics/train.csv without its speeds."""
    with open(workdir / "metrics" / "train.csv") as f:
        return [{k: v for k, v in row.items() if k != "steps_per_s"} for row in csv.DictReader(f)]


def report_body(workdir: Path) -> str:
    """report.md without its run-metadata section (dates, durations, the run folder)."""
    return (workdir / "alignment" / "report.md").read_text().split("## Run metadata")[0]


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    """The tiny study by two processes of scripts/run_pipeline.py, started as from a shell."""
    workdir = tmp_path_factory.mktemp("job") / "run"
    done = finish(start_job("scripts/run_pipeline.py", *TINY, f"--workdir={workdir}"))
    succeeded(done)
    return workdir, done


def test_two_processes_train_like_one_with_all_the_devices(job_run, trained_run):
    workdir, _ = job_run
    one = train_rows(trained_run[1])
    two = train_rows(workdir)
    assert [row["step"] for row in two] == [row["step"] for row in one] == ["5", "10", "15", "20"]
    for key in ("loss", "accuracy", "grad_norm"):  # within 1e-5 (the CSV keeps 6 significant digits)
        np.testing.assert_allclose([float(r[key]) for r in two], [float(r[key]) for r in one], rtol=1e-5, atol=1e-5)


def test_the_report_of_two_processes_is_the_report_of_one(job_run, trained_run, tmp_path):
    workdir, done = job_run
    single = tmp_path / "single"
    shutil.copytree(trained_run[1], single)  # demos and training done: embedding and alignment to go
    run_pipeline(tiny_config(), single, progress=False)
    assert report_body(workdir) == report_body(single)
    summaries = [json.loads((w / "alignment" / "summary.json").read_text()) for w in (workdir, single)]
    assert [p["a"] + "~" + p["b"] for p in summaries[0]["pairs"]] == [p["a"] + "~" + p["b"] for p in summaries[1]["pairs"]]
    for two, one in zip(summaries[0]["pairs"], summaries[1]["pairs"], strict=True):
        for which in ("last", "best"):
            for key, value in one[which].items():
                np.testing.assert_allclose(two[which][key], value, atol=1e-6, err_msg=f"{one['a']}~{one['b']} {key}")
    # Process 0 prints the report's headline; the other prints nothing of its own.
    assert "precision@5 over N = 36" in done[0].stdout
    assert "precision@" not in done[1].stdout and "error" not in done[1].stderr


def test_each_artifact_is_written_once(job_run):
    workdir, _ = job_run
    assert (workdir / LOCK_FILE).read_text() == ""  # released
    assert not [p for p in workdir.rglob("*") if p.name.endswith(".tmp")]
    with open(workdir / "eval" / "eval.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["20"]
    assert len(list((workdir / "metrics").glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (workdir / "eval").glob("step_*.json")] == ["step_00000020.json"]
    runs = json.loads((workdir / "pipeline.json").read_text())["runs"]
    assert len(runs) == 1 and set(runs[0]["seconds"]) == {"demos", "train", "embed", "align"}
    log = (workdir / "logs" / "pipeline.log").read_text()
    assert log.count("stage train") == 1
    assert log.count("instructions written to") == 1 and log.count("snapshots of training written to") == 1
    for step in ("10", "20"):
        assert (workdir / "checkpoints" / step / "files.json").exists()
    # Orbax saved collectively: each process wrote its own part, none another's.
    assert sorted(p.name for p in (workdir / "checkpoints" / "20" / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0", "ocdbt.process_1"]


def test_a_job_killed_mid_run_resumes_to_the_parameters_of_one_not_killed(job_run, tmp_path):
    """Both processes SIGKILLed after the checkpoint of step 10 (or 15, on a busy machine), and that
    checkpoint then damaged in the part process 1 wrote; started again, process 0 finds the damage, every
    process restores the checkpoint before it, and the job ends with the parameters of the uninterrupted
    job, bit for bit (gloo's sums repeat)."""
    uninterrupted, _ = job_run
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copytree(uninterrupted / "demos", workdir / "demos")
    flags = ("scripts/train.py", *TINY, "--config.train.checkpoint_every=5", f"--workdir={workdir}")
    job = start_job(*flags)
    checkpoints = workdir / "checkpoints"
    deadline = time.monotonic() + TIMEOUT
    while not any((checkpoints / step / "files.json").exists() for step in ("10", "15")):
        if time.monotonic() > deadline or any(p.poll() is not None for p in job):
            pytest.fail(f"the job ended or hung before its checkpoint of step 10\n{kill(job)}")
        time.sleep(0.02)
    kill(job)
    assert not (checkpoints / "20").exists(), "killed too late to test a resume"
    newest = max(int(p.parent.name) for p in checkpoints.glob("*/files.json"))
    data = max((checkpoints / str(newest)).glob("state/ocdbt.process_1/d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])

    done = finish(start_job(*flags))
    succeeded(done)
    assert f"the checkpoint at step {newest} is damaged ({data} has" in done[0].stderr
    assert "damaged" not in done[1].stderr  # process 0 tells; process 1 took the same decision
    assert (checkpoints / "damaged" / str(newest)).is_dir()
    chex.assert_trees_all_equal(restore_agent(workdir).params, restore_agent(uninterrupted).params)
    assert train_rows(workdir) == train_rows(uninterrupted)  # each step logged once, as before the kill


def test_a_second_job_on_the_folder_is_refused_on_every_process(job_run, tmp_path):
    workdir, _ = job_run
    with hold_run_folder(workdir):
        done = finish(start_job("scripts/train.py", *TINY, f"--workdir={workdir}"))
    lines = [process.stderr.strip().splitlines()[-1] for process in done]
    assert [process.returncode for process in done] == [2, 2]
    assert lines[0] == lines[1] and lines[0].startswith(f"error: {workdir} is in use by pid {os.getpid()}")
    assert "Traceback" not in done[0].stderr + done[1].stderr


def test_neighbours_over_the_mesh_of_two_processes_and_one_error_for_all(tmp_path):
    """tests/multiprocess_worker.py: nearest_neighbours (and knn_indices) over 8 devices of 2 processes equals
    8 devices of one (this session), on every process, bit for bit; an error of process 0 (on_process_zero) or of any (on_every_process) is
    raised on both; a process that does not see the folder process 0 locked stops the job."""
    succeeded(finish(start_job("tests/multiprocess_worker.py", f"--out={tmp_path}",
                               workdirs=[tmp_path / "held_0", tmp_path / "held_1"])))
    for case, (n, d, k, block) in KNN_CASES.items():
        single = dict(zip(("similarities", "ids"), nearest_neighbours(knn_input(n, d), k, block_size=block),
                          strict=True))
        for process in range(PROCESSES):
            with np.load(tmp_path / f"knn_{case}_{process}.npz") as job:
                for name, value in single.items():
                    np.testing.assert_array_equal(job[name], value, err_msg=f"{case} {name}")
    zero, one = (json.loads((tmp_path / f"outcomes_{p}.json").read_text()) for p in range(PROCESSES))
    assert zero["zero_user_error"] == one["zero_user_error"] == "LvaaError: bad setting on 0"
    assert zero["zero_bug"] == "ValueError: boom"
    assert one["zero_bug"] == "LvaaError: process 0 stopped on an error (ValueError: boom); see its log"
    assert zero["zero_result"] == one["zero_result"] == "returned {'answer': [0]}"
    assert zero["every_user_error"] == one["every_user_error"] == "LvaaError: bad file on 1"
    assert zero["gather"] == one["gather"] == "returned [0, 10]"
    assert zero["hold"] == one["hold"]
    assert "process 1 does not see the lock that process 0 of its job took" in one["hold"]
    assert (tmp_path / "held_0" / LOCK_FILE).read_text() == ""  # process 0 let it go


@pytest.mark.parametrize(("meeting", "expected"), [
    (("localhost:1234", 2, None), "--coordinator_address, --num_processes and --process_id go together"),
    (("localhost", 2, 0), "--coordinator_address=localhost: must be HOST:PORT"),
    (("localhost:1234", 2, 2), "--process_id=2, --num_processes=2: need 0 <= process_id < num_processes"),
])
def test_where_to_meet_is_checked_before_joining(meeting, expected):
    with pytest.raises(LvaaError, match=expected):
        distributed.initialize(*meeting)


@pytest.mark.parametrize(("script", "flags", "expected"), [
    *[(script, ("--num_processes=2", "--process_id=0"),
       "error: --num_processes, --process_id without --distributed: add --distributed to run as one of several "
       "processes") for script in ("train.py", "align.py", "run_pipeline.py")],
    ("run_pipeline.py", ("--distributed", "--coordinator_address=localhost"),
     "error: --coordinator_address, --num_processes and --process_id go together"),
    ("train.py", ("--distributed",), "error: --distributed: could not join the job from the environment: "
                                     "coordinator_address should be defined; start every process with the same "
                                     "--coordinator_address"),
])
def test_meeting_mistakes_are_one_line(script, flags, expected):
    """The last: no cluster in the environment (not SLURM, not a TPU VM) and no address given."""
    assert user_error(run_script(script, *TINY, *flags)).startswith(expected)
