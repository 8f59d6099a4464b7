"""How a model's token states become one vector per instruction; the same code for every backend.

Written against the array API that numpy and ``jax.numpy`` share (pass ``xp``), so a backend pools either on
the host (numpy, after its forward pass) or inside its own jitted forward (``jax.numpy``), with one
definition of what each pooling reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lvaa_jax.errors import LvaaError

TOKEN_POOLINGS = ("mean", "cls", "last", "eos")  # "projected" (CLIP) is the model's own output, not a pooling


def pool_tokens(hidden: Any, mask: Any, pooling: str, xp: Any = np) -> Any:
    """[B, T, D] token states -> [B, D] float32; ``mask`` [B, T] (bool) marks the real tokens, padded on either
    side. A pad position's state may be anything, NaN included: it is never read."""
    hidden = hidden.astype(xp.float32)
    if pooling == "mean":  # where, not a product: NaN * 0 is NaN
        return xp.where(mask[..., None], hidden, 0).sum(1) / mask.sum(1, keepdims=True).astype(xp.float32)
    if pooling == "cls":
        index = xp.argmax(mask.astype(xp.int32), axis=1)  # the first real token
    elif pooling in ("last", "eos"):
        index = mask.shape[1] - 1 - xp.argmax(mask[:, ::-1].astype(xp.int32), axis=1)  # the last real token
    else:
        raise LvaaError(f"unknown token pooling {pooling!r}; known: {', '.join(TOKEN_POOLINGS)}")
    return xp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def pool_layers(states: tuple, mask: Any, pooling: str, all_layers: bool, xp: Any = np) -> Any:
    """[layers, B, D] (``all_layers``) or [B, D]: ``states`` is every layer's [B, T, D], the input embeddings
    first and the model's output (after any final norm) last, so ``all_layers`` ends with the last-layer table."""
    if not all_layers:
        return pool_tokens(states[-1], mask, pooling, xp)
    return xp.stack([pool_tokens(h, mask, pooling, xp) for h in states])
