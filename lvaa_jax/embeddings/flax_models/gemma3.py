"""Gemma 3's text decoder (Gemma 3 270M ...), as transformers' Gemma3TextModel.

What sets it apart from Llama: token embeddings scaled by sqrt(width) (rounded to the weights' dtype), (1 + w)
RMSNorms before and after both attention and MLP, and on every query and key head; scores scaled by
``query_pre_attn_scalar ** -0.5``; sliding-window layers and global layers interleaved, each kind with its own
rope base; a GELU-tanh gated MLP. Hidden states: the scaled embeddings, every layer's output, the last one
after the final norm.
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
    RMSNorm,
    Unsupported,
    activation,
    key_mask,
    rope_frequencies,
    rotary_tables,
    scan_windows,
    stack,
)
from lvaa_jax.embeddings.flax_models.llama import layer_windows


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    activation: str
    eps: float
    attention_bias: bool
    query_scale: float
    softcap: float | None
    layer_types: tuple[str, ...]
    windows: tuple[int | None, ...]
    inverse_frequencies: tuple[tuple[str, tuple[float, ...]], ...]  # per layer type

    @classmethod
    def from_hf(cls, config: Any) -> Gemma3Config:
        if getattr(config, "use_bidirectional_attention", False):
            raise Unsupported("bidirectional attention (EmbeddingGemma)")
        activation(config.hidden_activation)
        types = tuple(config.layer_types)
        frequencies = tuple((t, tuple(rope_frequencies(config.rope_parameters[t], config.head_dim).tolist()))
                            for t in sorted(set(types)))
        return cls(config.vocab_size, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   config.head_dim, config.intermediate_size, config.hidden_activation, config.rms_norm_eps,
                   bool(config.attention_bias), config.query_pre_attn_scalar ** -0.5, config.attn_logit_softcapping,
                   types, layer_windows(config), frequencies)


class Gemma3Block(nn.Module):
    config: Gemma3Config
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, window: jax.Array, cos: jax.Array,
                 sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config

        def norm(name: str) -> RMSNorm:
            return RMSNorm(c.eps, 1.0, self.dtype, name=name)

        attention = Attention(c.num_heads, c.head_dim, c.num_kv_heads, qkv_bias=c.attention_bias,
                              out_bias=c.attention_bias, scale=c.query_scale, qk_norm_eps=c.eps, softcap=c.softcap,
                              dtype=self.dtype, name="self_attn")
        allowed = key_mask(mask, causal=True, window=window)
        x = x + norm("post_attention_layernorm")(attention(norm("input_layernorm")(x), allowed, (cos, sin)))
        mlp = GatedMLP(c.intermediate_size, c.activation, dtype=self.dtype, name="mlp")
        x = x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x)))
        return x, x


class Gemma3(nn.Module):
    config: Gemma3Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        c = self.config
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embed_tokens")(ids)
        x = x * jnp.asarray(c.hidden_size ** 0.5, self.dtype)
        rotary = {t: rotary_tables(np.asarray(f, np.float32), ids.shape[1]) for t, f in c.inverse_frequencies}
        cos, sin = (np.stack([rotary[t][i] for t in c.layer_types]) for i in (0, 1))  # [layers, T, head_dim]
        layers = stack(Gemma3Block, len(c.layer_types), in_axes=(nn.broadcast, 0, 0, 0))
        last, states = layers(c, self.dtype, name="layers.{}")(x, mask, scan_windows(c.windows), cos, sin)
        return (x, *states[:-1], RMSNorm(c.eps, 1.0, self.dtype, name="norm")(last))
