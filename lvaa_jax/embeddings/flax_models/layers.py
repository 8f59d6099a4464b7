"""The pieces the architectures share: linear and embedding layers, the two norms, rotary positions, attention
and the gated MLP.

Every parameter is named and laid out as in the Hugging Face checkpoint (``weight`` [out, in], ``bias``), and
each module names its sub-modules with the checkpoint's dotted names (``name="attention.self.query"``), so a
checkpoint maps onto a parameter tree by name alone (``weights.py``), with no per-model conversion table.
Float32 means float32 on every device (matmuls at the highest precision: TPU and GPU would otherwise round
inputs to bfloat16 or TF32); bfloat16 and float16 run at the device's native precision. Norm statistics,
attention scores and softmax are float32 whatever the dtype, as in transformers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvaa_jax.errors import LvaaError

Dtype = Any
# Parameters are only initialised to build tests' random models and the shapes a checkpoint must fill.
INIT = nn.initializers.normal(0.02)


class Unsupported(LvaaError):
    """A configuration this backend does not implement (the ``auto`` backend then runs the model on torch)."""


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise Unsupported(f"activation {name!r} (known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def precision(dtype: Dtype) -> jax.lax.Precision:
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


class Linear(nn.Module):
    """``x @ weight.T + bias`` with ``weight`` [out, in] as torch stores it (XLA contracts it in place).

    ``parallel`` says how a ``model`` mesh axis splits the weight: ``column`` splits the outputs (queries,
    keys, values, an MLP's expansion), ``row`` the inputs (the projections back into the residual stream),
    so that a block needs one all-reduce (Megatron-LM's layout)."""

    features: int
    use_bias: bool = True
    parallel: str = "column"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = ("model", None) if self.parallel == "column" else (None, "model")
        weight = self.param("weight", nn.with_partitioning(INIT, axes), (self.features, x.shape[-1]))
        y = jax.lax.dot_general(x.astype(self.dtype), weight.astype(self.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                                precision=precision(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class Embed(nn.Module):
    """A lookup table ``weight`` [rows, features], split over the ``model`` axis by rows (the vocabulary)."""

    rows: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.param("weight", nn.with_partitioning(INIT, ("model", None)), (self.rows, self.features))
        return jnp.take(table, ids, axis=0).astype(self.dtype)


class LayerNorm(nn.Module):
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        normed = (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + self.eps)
        weight = self.param("weight", nn.initializers.ones, (width,)).astype(jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (width,)).astype(jnp.float32)
        return (normed * weight + bias).astype(self.dtype)


class RMSNorm(nn.Module):
    """Llama's RMSNorm (``offset`` 0: scale by ``weight``) or Gemma's (``offset`` 1: by ``1 + weight``)."""

    eps: float
    offset: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],)).astype(jnp.float32)
        return (normed * (self.offset + weight)).astype(self.dtype)


# ---------------------------------------------------------------------------------------------------
# Rotary positions.

def rope_frequencies(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """The inverse frequencies [head_dim / 2] of a ``config.rope_parameters`` entry, as transformers computes
    them (float32), for the rope types the panels use: ``default``, ``linear`` and ``llama3``."""
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise Unsupported(f"partial rotary embeddings (factor {rope['partial_rotary_factor']})")
    kind = rope.get("rope_type", "default")
    inverse = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    if kind == "linear":
        inverse = inverse / rope["factor"]
    elif kind == "llama3":  # Llama 3.1: long wavelengths slowed by ``factor``, a smooth ramp between
        old_context = rope["original_max_position_embeddings"]
        low, high = old_context / rope["low_freq_factor"], old_context / rope["high_freq_factor"]
        wavelength = 2 * np.pi / inverse
        scaled = np.where(wavelength > low, inverse / rope["factor"], inverse)
        smooth = (old_context / wavelength - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / rope["factor"] + smooth * scaled
        inverse = np.where((wavelength >= high) & (wavelength <= low), smoothed, scaled)
    elif kind != "default":
        raise Unsupported(f"rope type {kind!r} (known: default, linear, llama3)")
    return inverse.astype(np.float32)


def rotary_tables(inverse_frequencies: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [length, head_dim] for positions 0..length-1 (constants folded into the compiled program)."""
    angles = np.arange(length, dtype=np.float32)[:, None] * inverse_frequencies[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def rotate(x: jax.Array, cos: np.ndarray, sin: np.ndarray) -> jax.Array:
    """Rotary embedding of x [B, T, heads, head_dim] in the rotate-half layout of transformers."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = (jnp.asarray(c[:, None, :], x.dtype) for c in (cos, sin))
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------------------
# Attention.

def key_mask(mask: jax.Array, causal: bool = False, window: Any = None) -> jax.Array:
    """Which keys each query sees, [B, T, T] bool: the real tokens (``mask`` [B, T]), causally, and within a
    sliding ``window`` (query i sees keys j with i - window < j, as transformers' sliding layers; an int, or a
    traced one inside a scan over layers)."""
    t = mask.shape[1]
    allowed = jnp.broadcast_to(mask[:, None, :], (mask.shape[0], t, t))
    query, key = np.arange(t)[:, None], np.arange(t)[None, :]
    if causal:
        allowed = allowed & (key <= query)
    if window is not None:
        allowed = allowed & (key > query - window)
    return allowed


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float,
           bias: jax.Array | None = None, softcap: float | None = None) -> jax.Array:
    """Scaled dot-product attention. q [B, T, H, d]; k and v [B, S, K, d] with K dividing H (grouped-query
    heads share a key and value head); ``allowed`` [B, T, S]; ``bias`` [1 or B, H, T, S] added to the scores."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=precision(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.reshape(bias.shape[0], kv, h // kv, t, -1).astype(jnp.float32)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=precision(v.dtype))
    return out.reshape(b, t, h * d)


class Attention(nn.Module):
    """Multi-head self-attention whose four projections carry the checkpoint's ``names`` (query, key, value,
    output), with grouped-query heads, optional per-head RMSNorms of queries and keys (Gemma 3) and optional rotary positions."""

    num_heads: int
    head_dim: int
    num_kv_heads: int = 0  # 0: as many as num_heads
    names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    qkv_bias: bool = False
    out_bias: bool = False
    scale: float = 0.0  # 0: head_dim ** -0.5
    qk_norm_eps: float = 0.0  # > 0: Gemma's (1 + w) RMSNorm of every query and key head
    softcap: float | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array, rotary: tuple[np.ndarray, np.ndarray] | None = None,
                 bias: jax.Array | None = None) -> jax.Array:
        b, t, width = x.shape
        kv_heads = self.num_kv_heads or self.num_heads

        def heads(index: int, count: int) -> jax.Array:
            projection = Linear(count * self.head_dim, self.qkv_bias, dtype=self.dtype, name=self.names[index])
            return projection(x).reshape(b, t, count, self.head_dim)

        q, k, v = heads(0, self.num_heads), heads(1, kv_heads), heads(2, kv_heads)
        if self.qk_norm_eps:
            q = RMSNorm(self.qk_norm_eps, 1.0, self.dtype, name="q_norm")(q)
            k = RMSNorm(self.qk_norm_eps, 1.0, self.dtype, name="k_norm")(k)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        out = attend(q, k, v, allowed, self.scale or self.head_dim ** -0.5, bias, self.softcap)
        return Linear(width, self.out_bias, "row", self.dtype, name=self.names[3])(out)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: Llama, Qwen2, Gemma 3 and nomic-bert, whose checkpoints name the three
    projections ``names`` (gate, up, down)."""

    hidden: int
    activation: str
    use_bias: bool = False
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate = Linear(self.hidden, self.use_bias, dtype=self.dtype, name=self.names[0])(x)
        up = Linear(self.hidden, self.use_bias, dtype=self.dtype, name=self.names[1])(x)
        down = Linear(x.shape[-1], self.use_bias, "row", self.dtype, name=self.names[2])
        return down(activation(self.activation)(gate) * up)


def stack(block: type[nn.Module], length: int, in_axes: Any = nn.broadcast) -> type[nn.Module]:
    """``block`` applied ``length`` times by one ``nn.scan``: XLA compiles one layer instead of ``length``
    copies (compile time no longer grows with depth; run time is the same). ``block`` maps (x, *inputs) to
    (x, x); the stack maps (x, *inputs) to (last x, every layer's x [length, ...]), ``inputs`` shared by every
    layer or, where ``in_axes`` says 0, one row per layer. Its parameters have a leading layer axis; named
    ``"...{}"``, ``weights.load_params`` fills row i from the checkpoint's layer i."""
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes, length=length,
                   metadata_params={nn.PARTITION_NAME: None})


def scan_windows(windows: Sequence[int | None]) -> np.ndarray:
    """Per-layer sliding windows as the int32 row a scan reads (a global layer's window covers everything)."""
    return np.asarray([w if w is not None else np.iinfo(np.int32).max // 2 for w in windows], np.int32)
