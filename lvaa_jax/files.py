"""Small file helpers every stage shares: atomic JSON and CSV, appended CSV rows, file hashes, run logs."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lvaa_jax.errors import LvaaError


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, remedy: str) -> Any:
    """A JSON file, or a one-line LvaaError naming it and the ``remedy`` when it is cut short or altered."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise LvaaError(f"{path}: not valid JSON, cut short or altered ({e}); {remedy}") from None


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Puts ``path`` into an OSError raised in the block without a file name (a failed ``write()`` names
    none), so that a full disk is reported with the file being written."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    with naming(path), open(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Deterministic (sorted keys) and atomic: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_bytes(tmp, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())
    os.replace(tmp, path)


def append_csv(path: str | os.PathLike, row: dict) -> None:
    """Appends one row, writing the header first when the file is new."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with naming(path), open(path, "a", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(row))
        if new:
            out.writeheader()
        out.writerow(row)


def write_csv(path: str | os.PathLike, rows: list[dict], fields: list[str]) -> None:
    """Atomic, like :func:`write_json`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with naming(tmp), open(tmp, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=fields)
        out.writeheader()
        out.writerows(rows)
    os.replace(tmp, path)


def drop_rows_after(path: str | os.PathLike, step: int) -> None:
    """Keeps the complete rows of a CSV with a ``step`` column up to ``step``: a run resumed from that step
    logs the later ones again, and a row cut short by a kill is no row."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = reader.fieldnames
    kept = [r for r in rows if None not in r.values() and r["step"].isdigit() and int(r["step"]) <= step]
    if len(kept) != len(rows):
        write_csv(path, kept, fields or ["step"])


@contextlib.contextmanager
def log_to_file(path: str | os.PathLike) -> Iterator[None]:
    """Copies the package's log records into ``path`` (appending) while the block runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("lvaa_jax")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(min(previous or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.close()
