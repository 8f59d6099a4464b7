"""MPNet (all-mpnet-base-v2): BERT's layers plus a learned relative-position bias shared by every layer.

Absolute positions count real tokens from ``padding_idx + 1`` (RoBERTa's scheme, read from the token ids as
transformers does); the relative bias buckets the distance between query and key (T5's log buckets).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvaa_jax.embeddings.flax_models.bert import BertConfig, BertLayer
from lvaa_jax.embeddings.flax_models.layers import Dtype, Embed, LayerNorm, key_mask, stack

PADDING_IDX = 1  # fixed in transformers' MPNetEmbeddings, whatever the config's pad_token_id
BUCKETS, MAX_DISTANCE = 32, 128  # transformers' compute_position_bias defaults (the embedding has config's rows)


@dataclasses.dataclass(frozen=True)
class MPNetConfig(BertConfig):
    relative_buckets: int = BUCKETS

    @classmethod
    def from_hf(cls, config: Any) -> MPNetConfig:
        base = BertConfig.from_hf(config)
        return cls(**{**dataclasses.asdict(base), "type_vocab_size": 0},
                   relative_buckets=config.relative_attention_num_buckets)


def relative_buckets(length: int) -> np.ndarray:
    """[length, length] bucket of key j for query i: exact below 8 positions, then logarithmic up to 128, with
    separate buckets for keys after the query; float32 as torch, so a boundary falls where it does there."""
    distance = np.arange(length)[None, :] - np.arange(length)[:, None]
    n = -distance
    half = BUCKETS // 2
    bucket = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    exact = half // 2
    scaled = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(exact)) / np.float32(np.log(MAX_DISTANCE / exact))
    large = exact + (scaled * np.float32(half - exact)).astype(np.int64)
    return bucket + np.where(n < exact, n, np.minimum(large, half - 1))


class MPNet(nn.Module):
    config: MPNetConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        c = self.config
        real = (ids != PADDING_IDX).astype(jnp.int32)
        positions = jnp.cumsum(real, axis=1) * real + PADDING_IDX
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embeddings.word_embeddings")(ids)
        x = x + Embed(c.max_positions, c.hidden_size, self.dtype, name="embeddings.position_embeddings")(positions)
        x = LayerNorm(c.eps, self.dtype, name="embeddings.LayerNorm")(x)
        table = Embed(c.relative_buckets, c.num_heads, jnp.float32, name="encoder.relative_attention_bias")
        bias = table(relative_buckets(ids.shape[1])).transpose(2, 0, 1)[None]  # [1, heads, T, T]
        layers = stack(BertLayer, c.num_layers)(c, self.dtype, ("attn.q", "attn.k", "attn.v", "attn.o"),
                                                "attention.LayerNorm", name="encoder.layer.{}")
        _, states = layers(x, key_mask(mask), bias)
        return (x, *states)
