"""Process setup shared by the entry points: the restart on huge pages, failed background writes."""

import asyncio
import io
import logging
import os
import subprocess
import sys

import pytest

from lvaa_jax import cli
from tests.script_runs import ROOT

REPORT = ("import os; from lvaa_jax.cli import restart_on_huge_pages; print('start', flush=True); "
          "restart_on_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))")


def run_python(tunables: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    result = subprocess.run([sys.executable, "-c", REPORT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120, check=True)
    return result.stdout.split()


@pytest.mark.skipif(not cli._glibc_with_huge_pages(), reason="needs glibc 2.35+ and transparent huge pages")
@pytest.mark.parametrize(("tunables", "expected"), [
    (None, "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
])
def test_restarts_once_on_huge_pages_keeping_other_tunables(tunables, expected):
    assert run_python(tunables) == ["start", "start", expected]


def test_a_chosen_setting_is_kept_without_restart():
    assert run_python("glibc.malloc.hugetlb=0") == ["start", "glibc.malloc.hugetlb=0"]


def test_failed_background_writes_are_one_line_each_once():
    """orbax's failed tensorstore coroutines: asyncio logs each with a traceback unless filtered."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    task_filter = cli._OneLineTaskFailures()
    logger.addFilter(task_filter)
    loop = asyncio.new_event_loop()
    try:
        for fragment in range(3):
            error = ValueError(f'RESOURCE_EXHAUSTED: Failed writing "d/{fragment}": No space left on device')
            loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": error})
    finally:
        loop.close()
        logger.removeFilter(task_filter)
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["a background write failed: ValueError: No space left on device"]
