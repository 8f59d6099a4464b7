"""A language or vision-language model space as a config names it: which model, read out how.

Torch-free: the spec is checked (and a panel validated) before any framework is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lvaa_jax.errors import LvaaError

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
DTYPES = ("float32", "bfloat16", "float16")
# auto: jax where lvaa_jax.embeddings.flax_models implements the model's architecture (and its weights are
# safetensors), torch otherwise; the table's meta records the backend that ran.
BACKENDS = ("auto", "jax", "torch")


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
    prefix: str = ""  # put before every instruction, where a model's card asks for a task prefix
    backend: str = "auto"
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
        if self.backend not in BACKENDS:
            raise LvaaError(f"{where}: unknown backend {self.backend!r}; known: {', '.join(BACKENDS)}")
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
