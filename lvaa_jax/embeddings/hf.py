"""Language and vision-language spaces: instructions embedded by Hugging Face models.

A space is one model read out one way (``spec.ModelSpec``): its ``kind`` (decoder LM, BERT-style encoder, CLIP
or BLIP text tower), a ``pooling`` of the token states, the ``layers`` kept and the ``backend`` that runs it.
Three concerns, three places: where the weights are (``sources``), how a model runs (``jax_models`` on the
Flax modules of ``flax_models``, or ``torch_models``), and how token states become one vector (``pooling``).
This module joins them: tokenizers, batching, the choice of backend, a space's identity and
``embed_with_model``. It imports transformers (for tokenizers and configs), never torch.
"""

from __future__ import annotations

import datetime
import importlib.metadata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lvaa_jax.embeddings import sources
from lvaa_jax.embeddings.controls import check_instructions
from lvaa_jax.embeddings.spec import ModelSpec
from lvaa_jax.errors import LvaaError
from lvaa_jax.progress import progress_bar

try:
    import transformers
except ImportError as e:
    raise LvaaError(f"lvaa_jax.embeddings.hf needs {e.name}: install the hf extra: pip install -e .[hf]") from None

__all__ = ["ModelSpec", "backend_of", "embed_with_model", "load_tokenizer", "meta_matches", "space_meta"]

LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)
BACKEND_PACKAGES = {"jax": ("jax", "jaxlib"), "torch": ("torch",)}  # their versions go into a table's meta


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_error(spec: ModelSpec, target: Any, what: str, why: str) -> LvaaError:
    """The one-line error for a failed load; a hub id (a str target) gets the way to work offline."""
    if not isinstance(target, str):
        return LvaaError(f"{spec.where}: could not load {what} from {target}: {why}")
    key = f"--config.{spec.where}.source" if spec.name else "source"
    return LvaaError(
        f"{spec.where}: could not load hub model {spec.source!r} ({why}); to work offline, download it where "
        f"the hub is reachable (`hf download {spec.source} --local-dir DIR`, or save_pretrained) and set {key}=DIR"
    )


def load_tokenizer(target: Any, spec: ModelSpec, **kwargs: Any) -> Any:
    """The model's Hugging Face tokenizer, with a pad token (any will do: pads are masked and never pooled)."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(target, **kwargs)
    except LOAD_ERRORS as e:
        raise load_error(spec, target, "the tokenizer", first_line(e)) from None
    if tokenizer.pad_token is None:  # Llama, GPT-2
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if tokenizer.pad_token is None:
            raise LvaaError(f"{spec.where}: the tokenizer has no pad, eos, unk or bos token to pad batches with")
    return tokenizer


def tokenize(tokenizer: Any, texts: list[str], tensors: str) -> Any:
    """A padded batch. Right padding for every kind: real tokens keep positions 0..n-1 and never attend to a pad
    (masked out, or after them in a causal model), so a row in a padded batch equals the row alone."""
    return tokenizer(texts, padding=True, padding_side="right", return_tensors=tensors)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """The instructions' indices in batches of similar length, shortest first: less padding, and the same
    result, since padding changes nothing. A smaller batch, if any, is the first: it holds the shortest
    instructions, so filling it up to full rows (the JAX backend, one compiled shape) pads the fewest tokens."""
    if batch_size < 1:
        raise LvaaError(f"embed.batch_size: must be at least 1, got {batch_size}")
    order = np.argsort(lengths, kind="stable")
    return np.split(order, range(len(order) % batch_size or batch_size, len(order), batch_size))


def encode_in_batches(encode_batch: Callable[[list[str]], np.ndarray], spec: ModelSpec,
                      instructions: Sequence[str], batch_size: int, progress: bool,
                      lengths: Sequence[int] | None = None) -> np.ndarray:
    """``encode_batch`` over ``length_batches`` (by ``lengths``, default the characters), with a progress bar,
    back in the instructions' order: float32 [..., N, D]."""
    items = check_instructions(instructions, spec.where)
    batches = length_batches([len(t) for t in items] if lengths is None else lengths, batch_size)
    label = spec.name or spec.source
    chunks = [encode_batch([spec.prefix + items[j] for j in b])
              for b in progress_bar(batches, desc=f"embed {label}", unit="batch", disable=not progress)]
    pooled = np.concatenate(chunks, axis=-2)
    embeddings = np.empty_like(pooled)
    embeddings[..., np.concatenate(batches), :] = pooled
    return embeddings


def installed_version(package: str) -> str:
    """The package's version, "" where it is not installed (a torch space then fails when it runs, saying so)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def backend_of(spec: ModelSpec, located: sources.Located) -> str:
    """The backend that runs a space: the spec's, or for ``auto`` jax where it implements the model (read from
    its config, no weights), else torch; "auto" while a hub model is not downloaded yet."""
    if spec.backend != "auto":
        return spec.backend
    if located.folder is None:
        return "auto"
    from lvaa_jax.embeddings import jax_models

    return "torch" if jax_models.unsupported(spec, located) else "jax"


def space_meta(spec: Any, backend: str = "") -> dict[str, Any]:
    """What identifies a model space's table, computed without loading the model (file hashes are cached).

    A stage can skip a space whose saved table agrees on all of it (see ``meta_matches``). A hub id that is
    not yet in the local cache has no path or hashes: it never matches, so it is embedded (and downloaded).
    The backend (``backend``: the one that ran, else ``backend_of``) and its framework's versions are part of
    it: a space whose backend changes is embedded again.
    """
    spec = ModelSpec.parse(spec)
    located = sources.locate(spec)
    files = sources.weight_files(located, spec.where) if located.folder else []
    backend = backend or backend_of(spec, located)
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
        "weights_sha256": {f.name: sources.file_sha256(f) for f in files},
        "backend": backend,
        **({"prefix": spec.prefix} if spec.prefix else {}),  # absent when empty: older tables stay valid
        "transformers_version": transformers.__version__,
        **{f"{p}_version": installed_version(p) for p in BACKEND_PACKAGES.get(backend, ())},
    }


def meta_matches(saved: Mapping[str, Any] | None, spec: Any) -> bool:
    """Whether a saved table's meta (``read_meta``) was made by this very space; extra keys are ignored."""
    return saved is not None and all(saved.get(k) == v for k, v in space_meta(spec).items())


def embed_with_model(spec: Any, instructions: Sequence[str], *, batch_size: int = 64, device: str = "auto",
                     progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """One model space's embeddings of the instructions and its table meta (``space_meta`` plus a ``run`` entry)."""
    spec = ModelSpec.parse(spec)
    check_instructions(instructions, spec.where)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    located = sources.locate(spec)
    if located.folder is None and spec.backend != "torch":  # the backend is chosen from the model's files
        from lvaa_jax.embeddings import jax_models

        located = jax_models.download(spec)
    backend = backend_of(spec, located)
    if backend == "jax":
        from lvaa_jax.embeddings import jax_models as models
    else:
        from lvaa_jax.embeddings import torch_models as models
    embeddings, run = models.embed(spec, instructions, batch_size=batch_size, device=device, progress=progress)
    return embeddings, dict(space_meta(spec, backend), run={"date": date, "batch_size": batch_size, **run})
