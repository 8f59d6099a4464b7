"""A checkpoint's tensors as numpy, mapped onto a Flax parameter tree by name; no torch.

safetensors files are read here rather than with the ``safetensors`` package because its numpy reader
refuses bfloat16 (the dtype most large checkpoints ship in); the format is a JSON header and raw
little-endian arrays. Parameters are matched to the checkpoint from the headers alone, and each is read from
disk only when it is placed on the devices, so the host holds one parameter at a time, not the model.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import traverse_util

from lvaa_jax.errors import LvaaError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# Names older checkpoints give LayerNorm parameters (bert-base-uncased); transformers renames them on load.
LEGACY_NAMES = {".weight": ".gamma", ".bias": ".beta"}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors file, as its header describes it; ``read`` loads it."""

    path: Path
    offset: int
    dtype: Any
    shape: tuple[int, ...]

    def read(self) -> np.ndarray:
        count = int(np.prod(self.shape, dtype=np.int64))
        return np.fromfile(self.path, self.dtype, count, offset=self.offset).reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class Weight:
    """A parameter's tensors in the checkpoint: one, or one per layer of a stack (rows of one array)."""

    tensors: tuple[Tensor, ...]
    stacked: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return ((len(self.tensors),) if self.stacked else ()) + self.tensors[0].shape

    def read(self) -> np.ndarray:
        return np.stack([t.read() for t in self.tensors]) if self.stacked else self.tensors[0].read()


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a .safetensors file, from its header (no data is read)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise LvaaError(f"{path}: tensor {name} has dtype {entry['dtype']}, which this reader does not know")
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        tensors[name] = Tensor(Path(path), 8 + size + entry["data_offsets"][0], dtype, tuple(entry["shape"]))
    return tensors


def checkpoint_tensors(folder: Path) -> dict[str, Tensor]:
    """The tensors of every .safetensors file in a model folder (a sharded checkpoint has several)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise LvaaError(f"{folder}: no *.safetensors weights (the jax backend reads safetensors only; "
                        "set backend='torch' for .bin checkpoints)")
    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors


def _key(tensors: Mapping[str, Tensor], name: str) -> str | None:
    """The checkpoint's key for a parameter: its name, or the legacy name of a LayerNorm's; None if absent."""
    if name in tensors:
        return name
    for new, old in LEGACY_NAMES.items():
        if name.endswith(new) and name[: -len(new)] + old in tensors:
            return name[: -len(new)] + old
    return None


def _prefix(names: list[str], tensors: Mapping[str, Tensor]) -> str:
    """The prefix under which the checkpoint holds the model (``""``, ``"model."`` for a causal LM,
    ``"text_encoder."`` for BLIP's retrieval model, ...): the shortest one that holds every parameter."""
    candidates: set[str] = set()
    for name in names:
        for full in (name, *(name[: -len(new)] + old for new, old in LEGACY_NAMES.items() if name.endswith(new))):
            candidates |= {k[: -len(full)] for k in tensors if k.endswith(full) and (k == full or k[-len(full) - 1] == ".")}
        if candidates:
            break
    ordered = sorted(candidates, key=len)
    for prefix in ordered:
        if all(_key(tensors, prefix + n) for n in names):
            return prefix
    return ordered[0] if ordered else ""


def load_params(abstract: Mapping[str, Any], tensors: Mapping[str, Tensor], where: str) -> dict[str, Any]:
    """The parameter tree shaped like ``abstract`` (the module's ``jax.eval_shape(init)``), each leaf the
    ``Weight`` of the checkpoint's tensors of the same dotted name; a name with ``{}`` (a stack of layers) is
    filled row by row, row i from the name with i in place of ``{}``. Extra tensors (heads, a vision tower)
    are ignored; a missing or misshapen one is an error, never a random weight."""
    flat = traverse_util.flatten_dict(abstract)  # module names hold dots themselves: keep the path tuples
    names = {(path, row): ".".join(path).replace("{}", str(row))
             for path, leaf in flat.items() for row in (range(leaf.shape[0]) if "{}" in ".".join(path) else [None])}
    prefix = _prefix(list(names.values()), tensors)
    keys = {slot: _key(tensors, prefix + name) for slot, name in names.items()}
    missing = [prefix + names[slot] for slot, key in keys.items() if key is None]
    if missing:
        raise LvaaError(f"{where}: the checkpoint lacks {len(missing)} weights the model needs "
                        f"(e.g. {missing[0]}): is its kind right?")
    rows: dict[tuple[str, ...], list[Tensor]] = {}
    for (path, row), key in keys.items():
        expected = flat[path].shape[1:] if row is not None else flat[path].shape
        if tensors[key].shape != tuple(expected):
            raise LvaaError(f"{where}: weight {key} has shape {tensors[key].shape}, the model expects "
                            f"{tuple(expected)}")
        rows.setdefault(path, []).append(tensors[key])
    return traverse_util.unflatten_dict({path: Weight(tuple(r), "{}" in ".".join(path)) for path, r in rows.items()})
