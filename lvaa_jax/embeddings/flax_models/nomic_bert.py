"""nomic-bert (nomic-embed-text-v1.5): a post-LayerNorm encoder with rotary positions and a gated SiLU MLP,
as transformers' NomicBertModel. Hidden states: the embeddings (after their LayerNorm), then every layer's.

Parameters carry the names of transformers' NomicBertModel in memory (``layers.N.self_attn.q_proj`` ...), which
is how ``nomic_gguf`` writes the panel's model. nomic's own checkpoints, and transformers' ``save_pretrained``,
use other names (``encoder.layers.N.attn.Wqkv``: queries, keys and values in one matrix, ``emb_ln``, ``fc11``
...): ``native_names`` maps those onto these when the weights are read.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvaa_jax.embeddings.flax_models.layers import (
    Attention,
    Dtype,
    Embed,
    GatedMLP,
    LayerNorm,
    activation,
    key_mask,
    rope_frequencies,
    rotary_tables,
    stack,
)
from lvaa_jax.embeddings.flax_models.weights import Tensor

# nomic's checkpoint names -> transformers' (its conversion mapping for nomic_bert, less the fused Wqkv)
ORIGINAL_NAMES = [(r"\bencoder\.layers\.", "layers."), (r"\bemb_ln\.", "embeddings.LayerNorm."),
                  (r"\.attn\.out_proj\.", ".self_attn.o_proj."), (r"\.mlp\.fc11\.", ".mlp.up_proj."),
                  (r"\.mlp\.fc12\.", ".mlp.gate_proj."), (r"\.mlp\.fc2\.", ".mlp.down_proj."),
                  (r"\.norm1\.", ".post_attention_layernorm."), (r"\.norm2\.", ".post_mlp_layernorm.")]


def native_names(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint in nomic's names as transformers' in-memory ones: renamed, and each fused ``attn.Wqkv``
    [3 x width, width] read as three row blocks of the file (no copy)."""
    renamed = {}
    for name, tensor in tensors.items():
        if name.endswith(".attn.Wqkv.weight"):
            rows = tensor.shape[0] // 3
            step = rows * tensor.shape[1] * tensor.dtype.itemsize
            for i, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                block = dataclasses.replace(tensor, offset=tensor.offset + i * step, shape=(rows, tensor.shape[1]))
                renamed[_renamed(name).replace(".attn.Wqkv.", f".self_attn.{projection}.")] = block
        else:
            renamed[_renamed(name)] = tensor
    return renamed


def _renamed(name: str) -> str:
    for pattern, replacement in ORIGINAL_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


@dataclasses.dataclass(frozen=True)
class NomicBertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    activation: str
    eps: float
    type_vocab_size: int
    inverse_frequencies: tuple[float, ...]

    @classmethod
    def from_hf(cls, config: Any) -> NomicBertConfig:
        activation(config.hidden_act)
        head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        return cls(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   head_dim, config.intermediate_size, config.hidden_act, config.layer_norm_eps,
                   config.type_vocab_size, tuple(rope_frequencies(config.rope_parameters, head_dim).tolist()))


class NomicBertLayer(nn.Module):
    config: NomicBertConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array, rotary: tuple[np.ndarray, np.ndarray]) -> tuple[jax.Array, jax.Array]:
        c = self.config
        attention = Attention(c.num_heads, c.head_dim, dtype=self.dtype, name="self_attn")
        x = LayerNorm(c.eps, self.dtype, name="post_attention_layernorm")(x + attention(x, allowed, rotary))
        h = GatedMLP(c.intermediate_size, c.activation, dtype=self.dtype, name="mlp")(x)
        x = LayerNorm(c.eps, self.dtype, name="post_mlp_layernorm")(x + h)
        return x, x


class NomicBert(nn.Module):
    config: NomicBertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        c = self.config
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embeddings.word_embeddings")(ids)
        types = Embed(c.type_vocab_size, c.hidden_size, self.dtype, name="embeddings.token_type_embeddings")
        x = LayerNorm(c.eps, self.dtype, name="embeddings.LayerNorm")(x + types(jnp.zeros_like(ids)))
        rotary = rotary_tables(np.asarray(c.inverse_frequencies, np.float32), ids.shape[1])
        layers = stack(NomicBertLayer, c.num_layers)(c, self.dtype, name="layers.{}")
        _, states = layers(x, key_mask(mask), rotary)
        return (x, *states)
