"""BERT (all-MiniLM-L6-v2, bert-base) and BLIP's text encoder: post-LayerNorm encoders with learned positions.

BLIP's text encoder is BERT without token types; read without an image its cross-attention never runs, so
the same module serves it. Hidden states: the embeddings (after their LayerNorm), then every layer's output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvaa_jax.embeddings.flax_models.layers import (
    Attention,
    Dtype,
    Embed,
    LayerNorm,
    Linear,
    Unsupported,
    activation,
    key_mask,
    stack,
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    activation: str
    eps: float
    max_positions: int
    type_vocab_size: int  # 0: no token-type embeddings (BLIP)

    @classmethod
    def from_hf(cls, config: Any) -> BertConfig:
        position_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if position_type != "absolute":
            raise Unsupported(f"position_embedding_type {position_type!r}")
        activation(config.hidden_act)
        return cls(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.intermediate_size, config.hidden_act, config.layer_norm_eps,
                   config.max_position_embeddings, getattr(config, "type_vocab_size", 0))


class BertLayer(nn.Module):
    """Attention, add and LayerNorm; MLP, add and LayerNorm. MPNet's layer is the same but for its names
    (``attention_names``, ``attention_norm``) and the relative-position ``bias`` it adds to the scores."""

    config: BertConfig
    dtype: Dtype
    attention_names: tuple[str, str, str, str] = ("self.query", "self.key", "self.value", "output.dense")
    attention_norm: str = "attention.output.LayerNorm"

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        c, width = self.config, self.config.hidden_size
        h = Attention(c.num_heads, width // c.num_heads, names=self.attention_names, qkv_bias=True, out_bias=True,
                      dtype=self.dtype, name="attention")(x, allowed, bias=bias)
        x = LayerNorm(c.eps, self.dtype, name=self.attention_norm)(h + x)
        h = activation(c.activation)(Linear(c.intermediate_size, dtype=self.dtype, name="intermediate.dense")(x))
        h = Linear(width, parallel="row", dtype=self.dtype, name="output.dense")(h)
        x = LayerNorm(c.eps, self.dtype, name="output.LayerNorm")(h + x)
        return x, x


class Bert(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        c = self.config
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embeddings.word_embeddings")(ids)
        if c.type_vocab_size:  # one segment: every token has type 0
            types = Embed(c.type_vocab_size, c.hidden_size, self.dtype, name="embeddings.token_type_embeddings")
            x = x + types(jnp.zeros_like(ids))
        positions = Embed(c.max_positions, c.hidden_size, self.dtype, name="embeddings.position_embeddings")
        x = LayerNorm(c.eps, self.dtype, name="embeddings.LayerNorm")(x + positions(jnp.arange(ids.shape[1])))
        _, states = stack(BertLayer, c.num_layers)(c, self.dtype, name="encoder.layer.{}")(x, key_mask(mask))
        return (x, *states)
