"""Flax (linen) forward passes of the panels' architectures, built from a Hugging Face config, no torch.

One short module per architecture, sharing ``layers``: ``bert`` (BERT, MiniLM, BLIP's text encoder), ``mpnet``,
``nomic_bert``, ``llama`` (Llama, Qwen2), ``gemma3`` and ``clip`` (the text tower). Each maps token ids and
their mask [B, T] to every layer's hidden states, the input embeddings first and the model's output (after any
final norm) last: the states ``torch_models`` reads from transformers, so both backends pool the same thing.
Parameters carry the checkpoint's names and layout, so ``weights.load_params`` fills them by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn

from lvaa_jax.embeddings.flax_models import bert, clip, gemma3, llama, mpnet, nomic_bert
from lvaa_jax.embeddings.flax_models.layers import Dtype, Unsupported
from lvaa_jax.embeddings.flax_models.weights import Tensor, checkpoint_tensors
from lvaa_jax.errors import LvaaError

# model_type (of the config a space reads) -> (module, its settings read from the Hugging Face config)
ARCHITECTURES: dict[str, tuple[type[nn.Module], Any]] = {
    "bert": (bert.Bert, bert.BertConfig),
    "blip_text_model": (bert.Bert, bert.BertConfig),
    "mpnet": (mpnet.MPNet, mpnet.MPNetConfig),
    "nomic_bert": (nomic_bert.NomicBert, nomic_bert.NomicBertConfig),
    "llama": (llama.Llama, llama.LlamaConfig),
    "qwen2": (llama.Llama, llama.LlamaConfig),
    "gemma3_text": (gemma3.Gemma3, gemma3.Gemma3Config),
    "clip_text_model": (clip.ClipText, clip.ClipTextConfig),
}
# GGUF general.architecture -> model_type, to choose a backend before a GGUF is de-quantised
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}
# module -> a mapping of other checkpoint layouts of its architecture onto its parameters' names
RENAMES: dict[type[nn.Module], Callable[[Mapping[str, Tensor]], dict[str, Tensor]]] = {
    nomic_bert.NomicBert: nomic_bert.native_names,
}
TOWERS = {"clip": ("clip", "clip_text_model"), "blip": ("blip", "blip_text_model")}  # kind -> (full, text)


def text_config(config: Any, kind: str, where: str) -> Any:
    """The config of the model a space runs: CLIP's and BLIP's text towers inside a full checkpoint."""
    if kind not in TOWERS:
        return config
    full, text = TOWERS[kind]
    if config.model_type == full:
        tower = config.text_config
        if kind == "clip":  # the projection's width is a field of the full config
            tower.projection_dim = config.projection_dim
        return tower
    if config.model_type != text:
        raise LvaaError(f"{where}: kind {kind!r} needs a {kind.upper()} checkpoint; this one is {config.model_type!r}")
    return config


def build(config: Any, kind: str, pooling: str, dtype: Dtype, where: str) -> nn.Module:
    """The Flax module of a space; ``Unsupported`` names what this backend lacks for it."""
    config = text_config(config, kind, where)
    if config.model_type not in ARCHITECTURES:
        raise Unsupported(f"architecture {config.model_type!r} (it has {', '.join(ARCHITECTURES)})")
    module, settings = ARCHITECTURES[config.model_type]
    settings = settings.from_hf(config)
    if kind == "clip" and pooling != "projected":  # the projection is only read for the projected embedding
        settings = dataclasses.replace(settings, projection_dim=0)
    return module(settings, dtype)


def module_tensors(module: nn.Module, folder: Path) -> dict[str, Tensor]:
    """The tensors of a model folder under the names the module's parameters carry."""
    tensors = checkpoint_tensors(folder)
    return RENAMES[type(module)](tensors) if type(module) in RENAMES else tensors


def max_length(module: nn.Module) -> int | None:
    """The longest input a module with learned absolute positions takes (None: rotary, no limit)."""
    positions = getattr(module.config, "max_positions", None)
    return positions - mpnet.PADDING_IDX - 1 if isinstance(module, mpnet.MPNet) else positions


__all__ = ["ARCHITECTURES", "GGUF_ARCHITECTURES", "Unsupported", "build", "max_length", "module_tensors", "text_config"]
