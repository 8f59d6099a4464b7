"""Runs an entry point of scripts/ in a subprocess, as a user would, and reads its one-line error."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{script}", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def user_error(result: subprocess.CompletedProcess) -> str:
    """The error line of a run that must fail as a user error: exit code 2, no traceback, one line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]
