"""The PyTorch backend: a model space run by Hugging Face ``transformers`` on torch.

Loading (with the checks that the weights fit the class), GGUF de-quantisation into the cache, and the
batched forward pass whose token states ``pooling`` turns into vectors. The only module that imports torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lvaa_jax.embeddings import hf, pooling, sources
from lvaa_jax.embeddings.spec import ModelSpec
from lvaa_jax.errors import LvaaError

try:
    import torch
    import transformers
except ImportError as e:
    raise LvaaError(f"the torch backend needs {e.name}: pip install -e .[hf,torch]") from None

# transformers' weight-loading bar redraws in log files; the embedding stage logs each model's load instead.
transformers.utils.logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to encode: the module whose forward gives the token states, its tokenizer, its meta."""

    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    meta: dict[str, Any]
    load_seconds: float


def _from_pretrained(cls: Any, target: Any, spec: ModelSpec, **kwargs: Any) -> Any:
    """cls.from_pretrained, refusing weights that do not fit the class (they would be random, not the model's)."""
    # Quiet: a text tower read from a full checkpoint reports every vision weight as unused; what matters
    # (weights missing, or of the wrong shape) is checked here or raised by transformers.
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(target, output_loading_info=True, **kwargs)
    except hf.LOAD_ERRORS as e:
        raise hf.load_error(spec, target, f"a {cls.__name__}", hf.first_line(e)) from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    # A missing pooler head does not matter: it is never read, the pooling is this package's.
    missing = sorted(k for k in info["missing_keys"] if not re.match(r"(.*\.)?pooler\.", k))
    if missing:
        raise LvaaError(f"{spec.where}: {target} lacks {len(missing)} weights of a {cls.__name__} "
                        f"(e.g. {missing[0]}): is kind {spec.kind!r} right for it?")
    return model.eval()


def save_dequantized(located: sources.Located, spec: ModelSpec, folder: Path) -> None:
    """Writes a GGUF model de-quantised to float32 safetensors, with its tokenizer, into ``folder``."""
    gguf = {"gguf_file": located.gguf_file}
    model = _from_pretrained(transformers.AutoModel, located.folder, spec, **gguf,
                             quantization_config=transformers.GgufConfig(dequantize=True))
    model.save_pretrained(folder)
    hf.load_tokenizer(located.folder, spec, **gguf).save_pretrained(folder)


def _config(target: Any, spec: ModelSpec, **kwargs: Any) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(target, **kwargs)
    except hf.LOAD_ERRORS as e:
        raise hf.load_error(spec, target, "a config", hf.first_line(e)) from None


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
    located = sources.locate(spec)
    if located.folder is None:  # a hub id not in the local cache: only the hub has it
        import huggingface_hub

        if huggingface_hub.is_offline_mode():
            why = "offline: HF_HUB_OFFLINE is set, and it is neither a local folder nor in the Hugging Face cache"
            raise hf.load_error(spec, spec.source, "", why)
        if spec.gguf_file:
            huggingface_hub.hf_hub_download(spec.source, spec.gguf_file, revision=spec.revision or None)
            located = sources.locate(spec)
    kwargs: dict[str, Any] = {"revision": spec.revision} if spec.revision and located.folder is None else {}
    target: Any = located.folder or spec.source
    if located.gguf_file:
        target = sources.dequantized_folder(located, lambda folder: save_dequantized(located, spec, folder))
    dtype = DTYPES[spec.dtype]
    if spec.kind == "clip":
        model = _clip_text_tower(target, spec, dtype, **kwargs)
    elif spec.kind == "blip":
        model = _blip_text_encoder(target, spec, dtype=dtype, **kwargs)
    else:
        model = _from_pretrained(transformers.AutoModel, target, spec, dtype=dtype, **kwargs)
    tokenizer = hf.load_tokenizer(target, spec, **kwargs)
    model.to(torch_device)
    return LoadedModel(spec, model, tokenizer, torch_device, hf.space_meta(spec, "torch"), time.perf_counter() - start)


def _encode_batch(loaded: LoadedModel, texts: list[str], accepts: set[str]) -> np.ndarray:
    spec = loaded.spec
    batch = hf.tokenize(loaded.tokenizer, texts, "pt")
    inputs = {k: v.to(loaded.device) for k, v in batch.items() if k in accepts}
    if "use_cache" in accepts:
        inputs["use_cache"] = False
    out = loaded.model(**inputs, output_hidden_states=spec.layers == "all")
    if spec.pooling == "projected":
        return out.text_embeds.float().cpu().numpy()
    mask = batch["attention_mask"].bool().numpy()
    # The last entry is the model's output (after any final norm), so layers='all' ends with layers='last'.
    states = (*out.hidden_states[:-1], out.last_hidden_state) if spec.layers == "all" else (out.last_hidden_state,)
    return pooling.pool_layers(tuple(h.float().cpu().numpy() for h in states), mask, spec.pooling, spec.layers == "all")


@torch.inference_mode()
def encode(loaded: LoadedModel, instructions: Sequence[str], *, batch_size: int = 64,
           progress: bool = True) -> np.ndarray:
    """float32 [N, D], or [layers + 1, N, D] with layers='all' (index 0: the input embeddings)."""
    accepts = set(inspect.signature(loaded.model.forward).parameters)
    return hf.encode_in_batches(lambda texts: _encode_batch(loaded, texts, accepts), loaded.spec, instructions,
                                batch_size, progress)


def embed(spec: ModelSpec, instructions: Sequence[str], *, batch_size: int, device: str,
          progress: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """This backend's half of ``hf.embed_with_model``: embeddings and the run record."""
    loaded = load_model(spec, device=device)
    start = time.perf_counter()
    embeddings = encode(loaded, instructions, batch_size=batch_size, progress=progress)
    return embeddings, {"device": str(loaded.device), "load_seconds": round(loaded.load_seconds, 3),
                        "encode_seconds": round(time.perf_counter() - start, 3)}


