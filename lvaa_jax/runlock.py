"""One run at a time per run folder: a kernel lock (``flock``) on ``<workdir>/run.lock``.

Two runs writing one folder would each "succeed" with every metrics row written twice, or race on the
renames of demo shards. The kernel drops a ``flock`` when its holder exits, however it exits (SIGKILL
included), so the lock of a dead run is simply taken over: there is nothing stale to clean up by hand.
The file records its holder (pid, host, command, start), so that a refused run names it; a run that ends
normally empties it, so a non-empty file found on taking the lock tells of a run that was killed.

Re-entrant within a process: ``run_pipeline`` holds the folder while each stage takes it again.

A job of several cooperating processes (``jax.distributed``) is one run: every process enters the stage,
process 0 alone takes the lock, and records a token of the job in the file; each other process is admitted
by reading that token back from the file (which also proves that it sees the same folder, as a job on
several hosts must: on NFS or another shared file system). A second job is refused by process 0's lock, and
all its processes end with the same line; a process that sees another token stops the whole job.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from lvaa_jax.distributed import cooperating, on_every_process, on_process_zero, process_count, process_index
from lvaa_jax.errors import LvaaError
from lvaa_jax.files import naming

log = logging.getLogger(__name__)
LOCK_FILE = "run.lock"
_held: dict[str, list] = {}  # resolved run folder -> [file descriptor (None: held by process 0 of the job), depth]
_guard = threading.Lock()
Stage = TypeVar("Stage", bound=Callable)


@contextlib.contextmanager
def hold_run_folder(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds ``workdir`` (created if missing) for the block; LvaaError naming the holder if another has it."""
    key = str(Path(workdir).resolve())
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_admit(Path(workdir)), 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                _release(entry[0])


def holds_run_folder(stage: Stage) -> Stage:
    """Decorates a stage function with a ``workdir`` argument: it runs holding that folder."""
    signature = inspect.signature(stage)

    @functools.wraps(stage)
    def locked(*args, **kwargs):
        with hold_run_folder(signature.bind(*args, **kwargs).arguments["workdir"]):
            return stage(*args, **kwargs)

    return locked  # type: ignore[return-value]


def _admit(workdir: Path) -> int | None:
    """The lock's file descriptor: this process's, or in a job of several processes, process 0's (None on
    the others, once admitted)."""
    if not cooperating():
        return _acquire(workdir)
    held = []

    def take() -> str:
        job = uuid.uuid4().hex
        held.append(_acquire(workdir, {"job": job, "processes": process_count()}))
        return job

    job = on_process_zero(take, "process 0 to lock the run folder")
    try:
        on_every_process(lambda: _check_admitted(workdir, job), "every process to see the lock")
    except BaseException:
        for fd in held:
            _release(fd)
        raise
    return held[0] if held else None


def _check_admitted(workdir: Path, job: str) -> None:
    record = _read(workdir / LOCK_FILE) or {}
    if record.get("job") != job:
        raise LvaaError(
            f"{workdir}: process {process_index()} does not see the lock that process 0 of its job took there "
            f"({workdir / LOCK_FILE} names {_describe(record) if record else 'no run'}); every process of a job "
            "must see the run folder at the same path, on a file system they share (NFS, Lustre, ...)"
        )


def _release(fd: int | None) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):  # a full or vanished disk must not hide the real error
        os.ftruncate(fd, 0)
    os.close(fd)  # releases the lock


def _acquire(workdir: Path, job: dict | None = None) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LvaaError(
            f"{workdir} is in use by {_holder(path)}; wait for that run to end (or stop it), or use another --workdir"
        ) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        log.warning("%s: this file system cannot lock files (%s); make sure no other run uses the folder",
                    workdir, e.strerror)
    previous = _read(path)
    if previous:
        log.warning("%s: the previous run (%s) ended without releasing the folder (killed?); taking it over",
                    workdir, _describe(previous))
    record = {
        "pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **(job or {}),
    }
    try:
        with naming(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _holder(path: Path) -> str:
    """The holder as recorded; it writes the record just after taking the lock, so wait a moment for it."""
    for _ in range(20):
        record = _read(path)
        if record:
            return _describe(record)
        time.sleep(0.05)
    return "another process"


def _describe(record: dict) -> str:
    job = f", process 0 of a job of {record['processes']}" if record.get("processes", 1) > 1 else ""
    return (f"pid {record.get('pid')} on {record.get('host')} since {record.get('started')} "
            f"({record.get('command')}{job})")
