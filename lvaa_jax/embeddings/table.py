"""The embedding-table file format shared by every space: ``embeddings/<space>.npz``.

Arrays: ``embeddings`` float32 [N, D] (or [layers, N, D] when every layer is kept), ``instructions``
(the N strings, in the canonical order all spaces share) and ``meta`` (a JSON object: model or
checkpoint, revision/hash, pooling, layers, dtype, date). No pickles: any numpy can read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lvaa_jax.errors import LvaaError


@dataclasses.dataclass(frozen=True)
class EmbeddingTable:
    """One space's embeddings of the instructions. ``embeddings`` is [N, D] or [layers, N, D]."""

    embeddings: np.ndarray
    instructions: tuple[str, ...]
    meta: dict[str, Any]

    @property
    def num_layers(self) -> int:
        return self.embeddings.shape[0] if self.embeddings.ndim == 3 else 1

    def layer(self, index: int = -1) -> np.ndarray:
        """[N, D] embeddings of one layer (the last by default); a 2-D table has only that one."""
        return self.embeddings[index] if self.embeddings.ndim == 3 else self.embeddings


def instructions_hash(instructions: Sequence[str]) -> str:
    """sha256 of the instruction list, order included: two tables are comparable iff these match."""
    return hashlib.sha256("\n".join(instructions).encode()).hexdigest()


def save_table(path: str | os.PathLike, embeddings: np.ndarray, instructions: Sequence[str], meta: dict) -> Path:
    """Writes a table atomically (a crash never leaves a half-written file under the final name)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    _check(embeddings, list(instructions), Path(path))
    meta = dict(meta, instructions_sha256=instructions_hash(instructions), shape=list(embeddings.shape))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        embeddings=embeddings,
        instructions=np.asarray(list(instructions), dtype=np.str_),
        meta=np.asarray(json.dumps(meta, sort_keys=True)),
    )
    os.replace(tmp, path)
    return path


def load_table(path: str | os.PathLike) -> EmbeddingTable:
    """Reads and validates a table; a malformed file is a one-line LvaaError naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            embeddings = data["embeddings"].astype(np.float32, copy=False)
            instructions = [str(s) for s in data["instructions"]]
            meta = json.loads(str(data["meta"]))
    except FileNotFoundError:
        raise LvaaError(f"{path}: no such embedding table") from None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a truncated .npz: BadZipFile
        raise LvaaError(f"{path}: not an embedding table (.npz with embeddings, instructions, meta): {e}") from None
    _check(embeddings, instructions, path)
    return EmbeddingTable(embeddings, tuple(instructions), meta)


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """A table's metadata without loading its arrays, or None when the file is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _check(embeddings: np.ndarray, instructions: list[str], path: Path) -> None:
    if embeddings.ndim not in (2, 3):
        raise LvaaError(f"{path}: embeddings must be [N, D] or [layers, N, D], got shape {embeddings.shape}")
    n = embeddings.shape[-2]
    if len(instructions) != n:
        raise LvaaError(f"{path}: {len(instructions)} instructions for {n} embedding rows")
    if n == 0:
        raise LvaaError(f"{path}: empty instruction list")
    if len(set(instructions)) != n:
        dup = next(s for s in instructions if instructions.count(s) > 1)
        raise LvaaError(f"{path}: duplicate instruction {dup!r}")
    if not np.isfinite(embeddings).all():
        raise LvaaError(f"{path}: embeddings contain NaN or inf")
