"""The Llama decoder family, one module configured per model: Llama 2/3 (and DeepSeek-LLM, which is Llama),
Qwen2 / Qwen2.5 (biases on queries, keys and values).

Pre-RMSNorm blocks, grouped-query attention with rotary positions (Llama 3.1's rope scaling included), a
gated SiLU MLP, a final RMSNorm. Hidden states as transformers returns them: the token embeddings, every
layer's output, the last one after the final norm.
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


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: global attention), from ``config.layer_types``."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise Unsupported(f"layer types {sorted(unknown)}")
    return tuple(config.sliding_window if t == "sliding_attention" else None for t in types)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    activation: str
    eps: float
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    inverse_frequencies: tuple[float, ...]
    windows: tuple[int | None, ...]  # one per layer

    @classmethod
    def from_hf(cls, config: Any) -> LlamaConfig:
        activation(config.hidden_act)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        qwen = config.model_type == "qwen2"  # Qwen2: biases on q, k, v only; Llama: attention_bias on all four
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(config.vocab_size, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   head_dim, config.intermediate_size, config.hidden_act, config.rms_norm_eps,
                   qkv_bias=qwen or attention_bias, out_bias=attention_bias and not qwen,
                   mlp_bias=bool(getattr(config, "mlp_bias", False)),
                   inverse_frequencies=tuple(rope_frequencies(config.rope_parameters, head_dim).tolist()),
                   windows=layer_windows(config))


class LlamaBlock(nn.Module):
    config: LlamaConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, window: jax.Array,
                 rotary: tuple[np.ndarray, np.ndarray]) -> tuple[jax.Array, jax.Array]:
        c = self.config
        attention = Attention(c.num_heads, c.head_dim, c.num_kv_heads, qkv_bias=c.qkv_bias, out_bias=c.out_bias,
                              dtype=self.dtype, name="self_attn")
        allowed = key_mask(mask, causal=True, window=window)
        x = x + attention(RMSNorm(c.eps, dtype=self.dtype, name="input_layernorm")(x), allowed, rotary)
        mlp = GatedMLP(c.intermediate_size, c.activation, c.mlp_bias, dtype=self.dtype, name="mlp")
        x = x + mlp(RMSNorm(c.eps, dtype=self.dtype, name="post_attention_layernorm")(x))
        return x, x


class Llama(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        c = self.config
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embed_tokens")(ids)
        rotary = rotary_tables(np.asarray(c.inverse_frequencies, np.float32), ids.shape[1])
        layers = stack(LlamaBlock, len(c.windows), in_axes=(nn.broadcast, 0, nn.broadcast))
        last, states = layers(c, self.dtype, name="layers.{}")(x, mask, scan_windows(c.windows), rotary)
        return (x, *states[:-1], RMSNorm(c.eps, dtype=self.dtype, name="norm")(last))
