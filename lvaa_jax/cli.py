"""What every absl entry point shares: config-file flag, workdir default, one-line errors, huge pages."""

from __future__ import annotations

import errno
import logging
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from lvaa_jax.errors import LvaaError


def define_config_flags(default_config: str = "configs/default.py") -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """Defines ``--config`` (file[:variant], with ``--config.a.b=v`` overrides) and ``--workdir``."""
    config = config_flags.DEFINE_config_file(
        "config", default_config, "Config file, optionally with a variant: configs/default.py:tiny.", lock_config=True
    )
    workdir = flags.DEFINE_string("workdir", None, "Run folder (default: runs/<config name>).")
    return config, workdir


class DistributedFlags:
    """``--distributed`` and where to meet: ``--coordinator_address``, ``--num_processes``, ``--process_id``
    (all three, or none to let ``jax.distributed.initialize()`` read the cluster from its environment)."""

    def __init__(self):
        self.distributed = flags.DEFINE_bool(
            "distributed", False, "Run as one of several cooperating processes (jax.distributed), e.g. one per "
            "host of a GPU cluster or TPU VM pod slice: start the same command in every process.")
        self.coordinator_address = flags.DEFINE_string(
            "coordinator_address", None, "With --distributed: HOST:PORT of process 0, where the processes meet.")
        self.num_processes = flags.DEFINE_integer("num_processes", None, "With --distributed: processes in the job.")
        self.process_id = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0..N-1.")

    def initialize(self) -> None:
        """Joins the job when ``--distributed`` is set (before any other JAX call). A process other than
        process 0 then logs errors only: process 0 tells the story of the run."""
        meeting = {"coordinator_address": self.coordinator_address.value, "num_processes": self.num_processes.value,
                   "process_id": self.process_id.value}
        if not self.distributed.value:
            given = [f"--{name}" for name, value in meeting.items() if value is not None]
            if given:
                raise LvaaError(f"{', '.join(given)} without --distributed: add --distributed to run as one of "
                                "several processes")
            return
        from lvaa_jax import distributed

        distributed.initialize(**meeting)
        if not distributed.is_primary():
            logging.getLogger("lvaa_jax").setLevel(logging.ERROR)


def resolve(config_flag: flags.FlagHolder, workdir_flag: flags.FlagHolder) -> tuple[ml_collections.ConfigDict, Path]:
    """The loaded config and the run folder; a config that failed to load becomes a one-line error."""
    config = loaded_config(config_flag)
    workdir = Path(workdir_flag.value or Path("runs") / config.name)
    return config, workdir


def loaded_config(config_flag: flags.FlagHolder) -> ml_collections.ConfigDict:
    """The config of a ``--config`` flag; one that failed to load becomes a one-line error."""
    config = config_flag.value
    if not isinstance(config, ml_collections.ConfigDict):
        try:
            config.name  # noqa: B018 - _ErrorConfig raises the load error on any access
        except Exception as e:  # noqa: BLE001 - re-raised as a user error
            raise LvaaError(f"--config: {_first_line(e)}") from None
        raise LvaaError(f"--config: {config!r} is not a ConfigDict (does get_config return one?)")
    return config


def _first_line(error: BaseException) -> str:
    cause = error.__cause__ or error
    text = str(cause).strip()
    if len(text) > 1 and text[0] == text[-1] == "'":  # ml_collections raises with a repr() of its message
        text = text[1:-1].replace("\\n", " ").replace("\\'", "'")
    lines = [line for line in text.splitlines() if line.strip()]
    if "Traceback" in text:  # absl wraps config-file errors with the whole traceback: keep the error itself
        lines = lines[-1:]
    return " ".join(" ".join(lines).split()) or type(cause).__name__


def _parse_flags(argv: Sequence[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit(f"{_first_line(e)} (--helpfull lists the flags)")
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        # ml_collections raises these for `--config.train.stpes=1` and friends.
        _exit(f"bad flag: {_first_line(e)}")


def _exit(message: str) -> None:
    """Prints the one line and exits. A failed orbax/tensorstore write leaves coroutines behind that
    report themselves as the interpreter shuts down (pages of 'Exception ignored in ...'); the line is
    the report, so those are dropped."""
    print(f"error: {message}", file=sys.stderr)
    sys.unraisablehook = lambda unraisable: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Task exception was never retrieved"
    sys.exit(2)


# Failures of the user's file system or paths rather than of this code: what to do about each.
STORAGE_ADVICE = {
    errno.EACCES: "choose a --workdir (or --out) you may write to, or fix its permissions",
    errno.EPERM: "choose a --workdir (or --out) you may write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a --workdir (or --out) on a writable one",
    errno.ENOSPC: "free space on that disk, or choose a --workdir on another; then run the same command again",
    errno.EDQUOT: "free space within your quota, or choose a --workdir on another disk; then run the same "
                  "command again",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another --workdir (or --out)",
}


def storage_error(error: OSError) -> str | None:
    """The one-line message for an OSError of the user's file system (permissions, read-only, full), else None.

    It names the first failure: closing files after a failed write (a full disk) fails again, often
    without a file name, and the later error carries the first in ``__context__``.
    """
    advice = STORAGE_ADVICE.get(error.errno)
    if advice is None:
        return None
    while isinstance(error.__context__, OSError) and error.__context__.errno == error.errno:
        error = error.__context__
    where = f"{error.filename}: " if error.filename else "a file write failed: "
    return f"{where}{error.strerror or os.strerror(error.errno)}; {advice}"


HUGE_PAGES = "glibc.malloc.hugetlb"


def restart_on_huge_pages() -> None:
    """Restarts this process once with glibc's malloc on transparent huge pages (``GLIBC_TUNABLES``
    ``glibc.malloc.hugetlb=1``), unless the variable already sets it, the C library is not glibc 2.35+,
    or the kernel has huge pages off.

    XLA:CPU puts every temporary of a jitted call in one allocation that glibc maps afresh on each call:
    79 MB for the default training step, which on 4 KB pages page-faults ~20k times per step and misses
    the TLB throughout. On 2 MB pages the default step is 1.2x faster on 2 CPU cores (measured, README).
    glibc reads the setting only when a process starts, hence the restart. Opt out with
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0``.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if HUGE_PAGES in tunables or not _glibc_with_huge_pages():
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, f"{HUGE_PAGES}=1")))
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _glibc_with_huge_pages() -> bool:
    library, version = platform.libc_ver()
    try:
        enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    return library == "glibc" and numbers >= (2, 35) and "[never]" not in enabled


class _OneLineTaskFailures(logging.Filter):
    """asyncio's "Task exception was never retrieved" as one short line, each distinct one once.

    orbax writes a checkpoint as many tensorstore coroutines; on a full disk each fails, and asyncio logs
    each with its traceback (pages) while the main thread's error becomes the run's one ``error:`` line.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or not str(record.msg).startswith("Task exception was never retrieved"):
            return True
        error = record.exc_info[1]
        reason = str(error).rsplit(": ", 1)[-1] if error is not None else "unknown"
        summary = f"a background write failed: {type(error).__name__}: {reason}"
        if summary in self._seen:
            return False
        self._seen.add(summary)
        record.msg, record.args, record.exc_info, record.exc_text = summary, (), None, None
        return True


def run(main: Callable[[Sequence[str]], None]) -> None:
    """``absl.app.run`` whose user errors (LvaaError, bad flags, a read-only or full disk) end as
    ``error: ...`` and exit code 2, in a process restarted on huge pages (:func:`restart_on_huge_pages`)."""
    restart_on_huge_pages()

    def guarded(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            _exit(f"unexpected arguments {list(argv[1:])}; every option is a --flag")
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax and jax log every save at INFO
        logging.getLogger("lvaa_jax").setLevel(logging.INFO)
        logging.getLogger("asyncio").addFilter(_OneLineTaskFailures())
        try:
            main(argv)
        except LvaaError as e:
            _exit(str(e))
        except OSError as e:
            message = storage_error(e)
            if message is None:
                raise
            _exit(message)
        except KeyboardInterrupt:
            _exit("interrupted; run the same command again to resume")

    app.run(guarded, flags_parser=_parse_flags)
