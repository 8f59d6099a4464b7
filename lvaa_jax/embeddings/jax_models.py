"""The JAX backend: a model space run by the Flax modules of ``flax_models`` on any JAX device, without torch.

Weights come from safetensors (a hub snapshot, a local folder, or the cache's de-quantised copy of a GGUF),
tokenizers from Hugging Face ``tokenizers``. The forward pass and the pooling are one jitted program per
(rows, length) shape, and an encode call plans a few padded lengths (``plan_lengths``), so a model compiles a
few times, not once per batch; compiled programs are kept in the user cache (XLA's persistent compilation
cache), so a second run compiles nothing. The batch is split over the mesh's ``data`` axis, and a model too
large for one device has its weight matrices split over a ``model`` axis (Megatron-style: column-parallel
in, row-parallel out).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lvaa_jax.embeddings import flax_models, hf, pooling, sources
from lvaa_jax.embeddings.controls import check_instructions
from lvaa_jax.embeddings.flax_models.layers import Unsupported
from lvaa_jax.embeddings.flax_models.weights import Weight, load_params
from lvaa_jax.embeddings.spec import ModelSpec
from lvaa_jax.errors import LvaaError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "tpu": "tpu"}
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]  # config, weights, tokenizer
MEMORY_FRACTION = 0.5  # parameters may fill this much of a device; more and they are split over `model`
PROGRAMS = 4  # padded lengths per encode call: compilations, against padding (see plan_lengths)


@dataclasses.dataclass
class LoadedModel:
    """A model ready to encode: module and placed parameters, tokenizer, mesh, and the programs compiled so far."""

    spec: ModelSpec
    module: nn.Module
    params: Any
    tokenizer: Any
    mesh: Mesh
    meta: dict[str, Any]
    load_seconds: float
    forward: Callable
    max_length: int | None
    programs: dict[tuple[int, int], Any] = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------
# Which models this backend runs.

def _config(folder: Path, spec: ModelSpec) -> Any:
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(folder)
    except hf.LOAD_ERRORS as e:
        raise hf.load_error(spec, folder, "a config", hf.first_line(e)) from None


def _gguf_model_type(path: Path) -> str:
    import gguf

    field = gguf.GGUFReader(path).fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode()
    return flax_models.GGUF_ARCHITECTURES.get(architecture, architecture)


def unsupported(spec: ModelSpec, located: sources.Located) -> str:
    """Why this backend cannot run a located space ("" if it can), from its config alone: no weight is read."""
    if located.gguf_file and not sources.dequantized_path(located).is_dir():
        model_type = _gguf_model_type(located.folder / located.gguf_file)
        return "" if model_type in flax_models.ARCHITECTURES else f"architecture {model_type!r}"
    folder = _folder(spec, located, make=False)
    if not any(folder.glob("*.safetensors")):
        return "weights that are not safetensors"
    try:
        flax_models.build(_config(folder, spec), spec.kind, spec.pooling, DTYPES[spec.dtype], spec.where)
    except Unsupported as e:
        return str(e)
    return ""


# ---------------------------------------------------------------------------------------------------
# Loading.

def _folder(spec: ModelSpec, located: sources.Located, make: bool = True) -> Path:
    """The folder with config, safetensors and tokenizer: the located one, or a GGUF's de-quantised copy."""
    if not located.gguf_file:
        return located.folder
    if not make:
        return sources.dequantized_path(located)

    def dequantize(folder: Path) -> None:
        # transformers' GGUF reader (names, Llama's Q/K permutation, Gemma's norm offset, the tokenizer) runs on
        # torch; it is needed once per GGUF file, and both backends read the copy it leaves in the cache.
        try:
            from lvaa_jax.embeddings import torch_models
        except LvaaError:
            raise LvaaError(f"{spec.where}: {located.gguf_file} must be de-quantised once into the cache, which "
                            "needs torch (transformers' GGUF reader): run this model once where torch is installed "
                            f"(pip install -e .[hf,torch]), or copy {sources.dequantized_path(located)} from a machine "
                            "that has it") from None
        torch_models.save_dequantized(located, spec, folder)

    return sources.dequantized_folder(located, dequantize)


def download(spec: ModelSpec) -> sources.Located:
    """A hub model's config, tokenizer and safetensors (or its GGUF file) into the Hugging Face cache."""
    import huggingface_hub

    if huggingface_hub.is_offline_mode():
        why = "offline: HF_HUB_OFFLINE is set, and it is neither a local folder nor in the Hugging Face cache"
        raise hf.load_error(spec, spec.source, "", why)
    revision = spec.revision or None
    try:
        if spec.gguf_file:
            huggingface_hub.hf_hub_download(spec.source, spec.gguf_file, revision=revision)
        else:
            huggingface_hub.snapshot_download(spec.source, revision=revision, allow_patterns=HUB_FILES)
    except (OSError, ValueError) as e:
        raise hf.load_error(spec, spec.source, "", hf.first_line(e)) from None
    return sources.locate(spec)


def _devices(device: str) -> list[jax.Device]:
    """Every device of the default platform (auto) or of one (cpu, cuda, tpu), or one device (cuda:1)."""
    if device == "auto":
        return jax.devices()
    name, _, index = device.partition(":")
    platform = PLATFORMS.get(name)
    if platform is None or not (index.isdigit() or not index):
        raise LvaaError(f"embed.device: unknown device {device!r}; use auto, {', '.join(PLATFORMS)} (or e.g. cuda:0)")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise LvaaError(f"embed.device: {device!r} asked for, but jax sees no {platform} device") from None
    if index and int(index) >= len(devices):
        raise LvaaError(f"embed.device: {device!r} asked for, but jax sees {len(devices)} {platform} devices")
    return [devices[int(index)]] if index else devices


def model_axis_size(devices: Sequence[jax.Device], param_bytes: int) -> int:
    """How many devices share one copy of the parameters: 1 while they fit in MEMORY_FRACTION of a device
    (the host CPU reports no limit), else the fewest (a power of two dividing the device count) that fit."""
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    size = 1
    while limit and param_bytes / size > MEMORY_FRACTION * limit and len(devices) % (2 * size) == 0:
        size *= 2
    return size


def make_mesh(devices: Sequence[jax.Device], model_parallel: int) -> Mesh:
    """A (data, model) mesh: batch rows over ``data``, weight matrices over ``model``."""
    if model_parallel < 1 or len(devices) % model_parallel:
        raise LvaaError(f"model_parallel={model_parallel} must be a divisor of the {len(devices)} devices")
    grid = np.asarray(devices).reshape(len(devices) // model_parallel, model_parallel)
    return Mesh(grid, ("data", "model"))


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """``spec`` with the axes that do not divide their dimension dropped (that dimension is then replicated)."""
    return PartitionSpec(*(a if a is None or shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(spec)))


def place(params: Any, partition: Any, mesh: Mesh, dtype: Any) -> Any:
    """Parameters (numpy arrays, or ``Weight``s read one at a time) cast to ``dtype`` and put on the mesh as
    ``partition`` (PartitionSpecs) says."""

    def put(value: Any, spec: PartitionSpec) -> jax.Array:
        value = (value.read() if isinstance(value, Weight) else np.asarray(value)).astype(dtype, copy=False)
        return jax.device_put(value, NamedSharding(mesh, _fit(spec, value.shape, mesh)))

    return jax.tree.map(put, params, partition)


def _forward(module: nn.Module, spec: ModelSpec) -> Callable:
    """params, ids, mask -> pooled float32 [B, D] or [layers + 1, B, D]: forward and pooling in one program."""
    all_layers = spec.layers == "all"

    def forward(params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        if spec.pooling == "projected":
            _, state = module.apply({"params": params}, ids, mask, mutable="intermediates")
            return state["intermediates"]["text_embeds"][0].astype(jnp.float32)
        states = module.apply({"params": params}, ids, mask)
        return pooling.pool_layers(states, mask, spec.pooling, all_layers, xp=jnp)

    return jax.jit(forward)


def use_compilation_cache() -> None:
    """XLA's persistent compilation cache in lvaa_jax's user cache, unless the user has set one."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(sources.cache_dir() / "xla"))


def load_model(spec: Any, *, device: str = "auto", model_parallel: int = 0) -> LoadedModel:
    """Locates, reads and places a model on the devices; raises LvaaError on any miss.

    ``model_parallel``: devices per parameter copy (0: as few as the parameters fit in, see model_axis_size)."""
    spec = ModelSpec.parse(spec)
    devices = _devices(device)
    use_compilation_cache()
    start = time.perf_counter()
    located = sources.locate(spec)
    if located.folder is None:
        located = download(spec)
    folder = _folder(spec, located)
    dtype = DTYPES[spec.dtype]
    try:
        module = flax_models.build(_config(folder, spec), spec.kind, spec.pooling, dtype, spec.where)
    except Unsupported as e:
        raise LvaaError(f"{spec.where}: the jax backend does not implement {e}; set backend='torch'") from None
    example = np.zeros((1, 8), np.int32)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), example, example.astype(bool)))["params"]
    params = load_params(nn.unbox(abstract), flax_models.module_tensors(module, folder), spec.where)
    param_bytes = sum(np.prod(w.shape) for w in jax.tree.leaves(params)) * jnp.dtype(dtype).itemsize
    mesh = make_mesh(devices, model_parallel or model_axis_size(devices, param_bytes))
    params = place(params, nn.get_partition_spec(abstract), mesh, dtype)
    tokenizer = hf.load_tokenizer(folder, spec)
    return LoadedModel(spec, module, params, tokenizer, mesh, hf.space_meta(spec, "jax"), time.perf_counter() - start,
                       _forward(module, spec), flax_models.max_length(module))


# ---------------------------------------------------------------------------------------------------
# Encoding.

def plan_lengths(longest: Sequence[int], rows: Sequence[int], programs: int = PROGRAMS) -> list[int]:
    """At most ``programs`` padded lengths for batches whose longest instructions have ``longest`` tokens (and
    ``rows`` rows), chosen among those lengths to pad the fewest tokens (dynamic programming over the sorted
    distinct lengths); a batch runs at the shortest planned length that holds it."""
    distinct = sorted(set(longest))
    below = np.cumsum([0] + [sum(r for n, r in zip(longest, rows, strict=True) if n == d) for d in distinct])
    # best[j]: the fewest tokens for the batches of the j shortest lengths (rows below[j]), and its plan;
    # each round allows one more planned length: the last one planned for them is distinct[j - 1]
    best = [(0, [])] + [(float("inf"), [])] * len(distinct)
    for _ in range(min(programs, len(distinct))):
        best = [(0, [])] + [min(((best[i][0] + distinct[j - 1] * (below[j] - below[i]), best[i][1] + [distinct[j - 1]])
                                 for i in range(j)), key=lambda option: option[0])
                            for j in range(1, len(distinct) + 1)]
    return best[-1][1]


def _program(loaded: LoadedModel, rows: int, length: int) -> Any:
    """The compiled program for a (rows, length) bucket; compile time is counted apart from running time."""
    key = (rows, length)
    if key not in loaded.programs:
        start = time.perf_counter()
        batch = NamedSharding(loaded.mesh, PartitionSpec("data", None))
        ids = jax.ShapeDtypeStruct(key, jnp.int32, sharding=batch)
        mask = jax.ShapeDtypeStruct(key, jnp.bool_, sharding=batch)
        loaded.programs[key] = loaded.forward.lower(loaded.params, ids, mask).compile()
        loaded.compile_seconds += time.perf_counter() - start
    return loaded.programs[key]


def _encode_batch(loaded: LoadedModel, texts: list[str], rows: int, lengths: list[int]) -> np.ndarray:
    """One batch padded to ``rows`` rows and the shortest planned length that holds it."""
    batch = hf.tokenize(loaded.tokenizer, texts, "np")
    ids, mask = batch["input_ids"], batch["attention_mask"].astype(bool)
    n, t = ids.shape
    length = min(p for p in lengths if p >= t)
    padded_ids = np.full((rows, length), loaded.tokenizer.pad_token_id, np.int32)
    padded_mask = np.zeros((rows, length), bool)
    padded_ids[:n, :t], padded_mask[:n, :t] = ids, mask
    padded_ids[n:], padded_mask[n:] = padded_ids[0], padded_mask[0]  # filler rows: a real row, then dropped
    sharding = NamedSharding(loaded.mesh, PartitionSpec("data", None))
    pooled = _program(loaded, rows, length)(loaded.params, jax.device_put(padded_ids, sharding),
                                            jax.device_put(padded_mask, sharding))
    return np.asarray(pooled)[..., :n, :]


def encode(loaded: LoadedModel, instructions: Sequence[str], *, batch_size: int = 64,
           progress: bool = True) -> np.ndarray:
    """float32 [N, D], or [layers + 1, N, D] with layers='all' (index 0: the input embeddings).

    Batches are made by token count and padded to at most PROGRAMS lengths planned from the batches' longest
    instructions, and every batch to the same rows (the first, smaller one, of the shortest instructions, with
    filler rows: a few short rows cost less than compiling a program for them), so a call compiles at most PROGRAMS programs."""
    spec = loaded.spec
    items = check_instructions(instructions, spec.where)
    tokens = [len(ids) for ids in loaded.tokenizer([spec.prefix + item for item in items])["input_ids"]]
    if loaded.max_length and max(tokens) > loaded.max_length:
        longest = items[int(np.argmax(tokens))]
        raise LvaaError(f"{spec.where}: {longest!r} has {max(tokens)} tokens, more than the model's "
                        f"{loaded.max_length} positions")
    batches = hf.length_batches(tokens, batch_size)
    lengths = plan_lengths([max(tokens[i] for i in b) for b in batches], [len(b) for b in batches])
    data = loaded.mesh.shape["data"]
    rows = -(-min(batch_size, len(items)) // data) * data  # whole rows per device
    return hf.encode_in_batches(lambda texts: _encode_batch(loaded, texts, rows, lengths), spec, items, batch_size,
                                progress, lengths=tokens)


def embed(spec: ModelSpec, instructions: Sequence[str], *, batch_size: int, device: str,
          progress: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """This backend's half of ``hf.embed_with_model``: embeddings and the run record."""
    loaded = load_model(spec, device=device)
    start = time.perf_counter()
    embeddings = encode(loaded, instructions, batch_size=batch_size, progress=progress)
    devices = loaded.mesh.devices.ravel()
    return embeddings, {"device": devices[0].platform, "mesh": dict(loaded.mesh.shape),
                        "load_seconds": round(loaded.load_seconds, 3),
                        "compile_seconds": round(loaded.compile_seconds, 3),
                        "encode_seconds": round(time.perf_counter() - start - loaded.compile_seconds, 3)}
