"""nomic-bert (nomic-embed-text-v1.5): a post-LayerNorm encoder with rotary positions and a gated SiLU MLP,
as transformers' NomicBertModel. Hidden states: the embeddings (after their LayerNorm), then every layer's.

Parameters carry the names of nomic's own checkpoints, which transformers also writes when it saves a
NomicBertModel: ``emb_ln``, ``encoder.layers.N.attn.Wqkv`` (queries, keys and values in one matrix),
``attn.out_proj``, ``mlp.fc11`` (up), ``mlp.fc12`` (gate), ``mlp.fc2`` (down), ``norm1``, ``norm2``.
"""

from __future__ import annotations

import dataclasses
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
        attention = Attention(c.num_heads, c.head_dim, names=("Wqkv", "", "", "out_proj"), fused_qkv=True,
                              dtype=self.dtype, name="attn")
        x = LayerNorm(c.eps, self.dtype, name="norm1")(x + attention(x, allowed, rotary))
        h = GatedMLP(c.intermediate_size, c.activation, names=("fc12", "fc11", "fc2"), dtype=self.dtype, name="mlp")(x)
        x = LayerNorm(c.eps, self.dtype, name="norm2")(x + h)
        return x, x


class NomicBert(nn.Module):
    config: NomicBertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        c = self.config
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embeddings.word_embeddings")(ids)
        types = Embed(c.type_vocab_size, c.hidden_size, self.dtype, name="embeddings.token_type_embeddings")
        x = LayerNorm(c.eps, self.dtype, name="emb_ln")(x + types(jnp.zeros_like(ids)))
        rotary = rotary_tables(np.asarray(c.inverse_frequencies, np.float32), ids.shape[1])
        layers = stack(NomicBertLayer, c.num_layers)(c, self.dtype, name="encoder.layers.{}")
        _, states = layers(x, key_mask(mask), rotary)
        return (x, *states)
