"""The on-disk demo format: flat memory-mappable shards, a manifest with sha256 of every file, a loader
that refuses a truncated or altered dataset.

Layout of ``demos/``::

    manifest.json            format version, levels, seeds, counts, versions, per-file sha256
    missions.json            every mission of the levels (sorted; ``mission_id`` indexes it)
    vocab.json               the word-level instruction tokenizer
    shard_00000/             step arrays image [S,7,7,3], direction [S], action [S] (uint8) and
                             per-episode start, length, mission_id, level_id, seed
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lvaa_jax.babyai.rollout import Episode
from lvaa_jax.babyai.tokenizer import Tokenizer
from lvaa_jax.errors import LvaaError
from lvaa_jax.files import read_json, sha256_file, write_bytes, write_json

FORMAT_VERSION = 1
STEP_ARRAYS = ("image", "direction", "action")
EPISODE_ARRAYS = ("start", "length", "mission_id", "level_id", "seed")
MANIFEST, MISSIONS, VOCAB = "manifest.json", "missions.json", "vocab.json"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def write_shard(
    directory: Path, episodes: Sequence[Episode], missions: dict[str, int], levels: Sequence[str],
    extra_json: Mapping[str, Any] | None = None,
) -> dict:
    """Writes one shard (and ``extra_json``, file name -> object) under a temporary name, then renames it:
    a shard folder is always complete."""
    lengths = np.asarray([len(e.action) for e in episodes], np.int32)
    arrays = {
        "image": np.concatenate([e.image for e in episodes]) if episodes else np.zeros((0, 7, 7, 3), np.uint8),
        "direction": np.concatenate([e.direction for e in episodes]) if episodes else np.zeros(0, np.uint8),
        "action": np.concatenate([e.action for e in episodes]) if episodes else np.zeros(0, np.uint8),
        "start": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if episodes else np.zeros(0, np.int64),
        "length": lengths,
        "mission_id": np.asarray([missions[e.mission] for e in episodes], np.int32),
        "level_id": np.asarray([levels.index(e.level) for e in episodes], np.int32),
        "seed": np.asarray([e.seed for e in episodes], np.int64),
    }
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for name, array in arrays.items():
        path = tmp / f"{name}.npy"
        buffer = io.BytesIO()  # np.save to a file reports a full disk without its errno
        np.save(buffer, array)
        write_bytes(path, buffer.getbuffer())
        files[f"{name}.npy"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "shape": list(array.shape)}
    info = {"episodes": len(episodes), "steps": int(lengths.sum()), "files": files}
    for name, obj in (extra_json or {}).items():
        write_json(tmp / name, obj)
    write_json(tmp / "shard.json", info)
    os.replace(tmp, directory)
    return info


@dataclasses.dataclass(frozen=True)
class DemoDataset:
    """A verified demo set. Step arrays stay memory-mapped per shard; episode tables are concatenated.

    ``shard[e]`` and ``start[e]`` locate episode ``e``'s steps in ``steps[shard[e]]``.
    """

    path: Path
    manifest: dict
    missions: tuple[str, ...]
    tokenizer: Tokenizer
    steps: tuple[dict[str, np.ndarray], ...]  # per shard: image, direction, action (memory-mapped)
    shard: np.ndarray
    start: np.ndarray
    length: np.ndarray
    mission_id: np.ndarray
    level_id: np.ndarray
    seed: np.ndarray

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.manifest["levels"])

    @property
    def num_episodes(self) -> int:
        return len(self.length)

    @property
    def max_instruction_length(self) -> int:
        return max(len(self.tokenizer.encode(m)) for m in self.missions)

    def episode(self, index: int) -> dict[str, Any]:
        """One episode's arrays (copied into memory) with its mission, level and seed."""
        arrays = self.steps[self.shard[index]]
        span = slice(self.start[index], self.start[index] + self.length[index])
        return {
            **{name: np.array(arrays[name][span]) for name in STEP_ARRAYS},
            "mission": self.missions[self.mission_id[index]],
            "level": self.levels[self.level_id[index]],
            "seed": int(self.seed[index]),
        }

    def seen_missions(self) -> set[str]:
        """Missions with at least one training episode (the rest of the census the agent never saw)."""
        return {self.missions[i] for i in np.unique(self.mission_id)}


def load_demos(path: str | os.PathLike, verify: bool = True) -> DemoDataset:
    """Opens a demo folder; refuses (one-line LvaaError) a missing, truncated or altered dataset.

    ``verify`` checks every file's sha256 against the manifest (about 1 s per GB); sizes and shapes are
    always checked.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        hint = " (generation was interrupted: run make_demos again to finish it)" if path.exists() else ""
        raise LvaaError(f"{path}: no demo dataset here (missing {MANIFEST}){hint}")
    manifest = read_json(manifest_path, "delete it and run make_demos again: it rebuilds it from the finished shards")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LvaaError(
            f"{manifest_path}: demo format version {manifest.get('format_version')}, this lvaa_jax reads "
            f"version {FORMAT_VERSION}; regenerate the demos with make_demos"
        )
    for name in (MISSIONS, VOCAB):
        _check_file(path / name, manifest["files"][name], verify)
    missions = tuple(json.loads((path / MISSIONS).read_text())["missions"])
    tokenizer = Tokenizer.load(path / VOCAB)
    steps, tables = [], {name: [] for name in EPISODE_ARRAYS}
    shard_of = []
    for index, (name, shard) in enumerate(sorted(manifest["shards"].items())):
        arrays = {}
        for file_name, expected in shard["files"].items():
            file_path = path / name / file_name
            _check_file(file_path, expected, verify)
            arrays[file_name.removesuffix(".npy")] = np.load(file_path, mmap_mode="r")
            if list(arrays[file_name.removesuffix(".npy")].shape) != expected["shape"]:
                raise LvaaError(f"{file_path}: shape differs from the manifest; the shard is corrupt")
        steps.append({k: arrays[k] for k in STEP_ARRAYS})
        for k in EPISODE_ARRAYS:
            tables[k].append(np.asarray(arrays[k]))
        shard_of.append(np.full(shard["episodes"], index, np.int32))
    return DemoDataset(
        path=path, manifest=manifest, missions=missions, tokenizer=tokenizer, steps=tuple(steps),
        shard=np.concatenate(shard_of), **{k: np.concatenate(v) for k, v in tables.items()},
    )


def _check_file(path: Path, expected: dict, verify: bool) -> None:
    if not path.exists():
        raise LvaaError(f"{path}: missing from the demo dataset")
    if path.stat().st_size != expected["bytes"]:
        raise LvaaError(f"{path}: {path.stat().st_size} bytes, the manifest says {expected['bytes']}; truncated or altered")
    if verify and sha256_file(path) != expected["sha256"]:
        raise LvaaError(f"{path}: sha256 differs from the manifest; the file was altered or corrupted")
