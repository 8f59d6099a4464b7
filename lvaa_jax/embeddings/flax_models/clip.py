"""CLIP's text tower, as transformers' CLIPTextModelWithProjection: pre-LayerNorm causal transformer, final
LayerNorm, and the projection of the end-of-text token's state (the text embedding CLIP is trained with),
sown as the intermediate ``text_embeds`` when the config has a ``projection_dim``.

Hidden states: the token + position embeddings, every layer's output, the last one after the final LayerNorm.
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
    activation,
    key_mask,
    stack,
)


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    activation: str
    eps: float
    max_positions: int
    eos_token_id: int
    projection_dim: int  # 0: a text tower without projection (pooling 'eos' or 'mean' only)

    @classmethod
    def from_hf(cls, config: Any) -> ClipTextConfig:
        activation(config.hidden_act)
        return cls(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.intermediate_size, config.hidden_act, config.layer_norm_eps, config.max_position_embeddings,
                   config.eos_token_id, getattr(config, "projection_dim", 0) or 0)


class ClipLayer(nn.Module):
    config: ClipTextConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
        c, width = self.config, self.config.hidden_size
        attention = Attention(c.num_heads, width // c.num_heads, names=("q_proj", "k_proj", "v_proj", "out_proj"),
                              qkv_bias=True, out_bias=True, dtype=self.dtype, name="self_attn")
        x = x + attention(LayerNorm(c.eps, self.dtype, name="layer_norm1")(x), allowed)
        h = Linear(c.intermediate_size, dtype=self.dtype, name="mlp.fc1")(LayerNorm(c.eps, self.dtype, name="layer_norm2")(x))
        x = x + Linear(width, parallel="row", dtype=self.dtype, name="mlp.fc2")(activation(c.activation)(h))
        return x, x


class ClipText(nn.Module):
    config: ClipTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        c = self.config
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="text_model.embeddings.token_embedding")(ids)
        positions = Embed(c.max_positions, c.hidden_size, self.dtype, name="text_model.embeddings.position_embedding")
        x = x + positions(jnp.arange(ids.shape[1]))
        layers = stack(ClipLayer, c.num_layers)(c, self.dtype, name="text_model.encoder.layers.{}")
        last, states = layers(x, key_mask(mask, causal=True))
        states = [x, *states[:-1], LayerNorm(c.eps, self.dtype, name="text_model.final_layer_norm")(last)]
        if c.projection_dim:  # the end-of-text state, found as transformers does: the first eos_token_id, or
            # for old configs that say 2 (before transformers#24773) the highest token id
            eos = jnp.argmax(ids, axis=1) if c.eos_token_id == 2 else jnp.argmax(ids == c.eos_token_id, axis=1)
            pooled = jnp.take_along_axis(states[-1], eos[:, None, None], axis=1)[:, 0]
            projection = Linear(c.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")
            self.sow("intermediates", "text_embeds", projection(pooled))
        return tuple(states)
