"""What every metric needs of an embedding space before it is scored: checks and preprocessing.

All checks run before any kernel, so that a bad table is a one-line LvaaError naming it rather than a NaN
matrix or an XLA error several minutes later.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lvaa_jax.errors import LvaaError

CLAMP_QUANTILE = 0.95


SAME_DIRECTION_TOLERANCE = 1e-6  # unit rows closer than this in every coordinate point the same way


def check_space(x, name: str = "embeddings") -> jax.Array:
    """``x`` as a float32 [N, D] device array, or an LvaaError naming ``name``: it must be 2-D with at least
    two rows, finite, have no zero rows (cosine similarity is undefined for those), and not point every row
    the same way (then every similarity is 1: neighbours would be decided by the tie rule alone, and CKA,
    Procrustes and RSA divide by a zero variance)."""
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    if x.ndim != 2:
        raise LvaaError(f"{name}: embeddings must be a 2-D [N, D] array, got shape {np.shape(x)}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise LvaaError(f"{name}: need at least 2 instructions and 1 feature, got shape {tuple(x.shape)}")
    x = jnp.asarray(x, jnp.float32)
    finite, norms = _finite_and_norms(x)
    if not finite:
        raise LvaaError(f"{name}: embeddings contain NaN or inf")
    zero = np.flatnonzero(np.asarray(norms) == 0)
    if zero.size:
        raise LvaaError(f"{name}: {zero.size} zero-norm row(s), the first is row {zero[0]}; cosine similarity "
                        "is undefined for them")
    if one_direction(x):
        raise LvaaError(f"{name}: all {x.shape[0]} rows point the same way (one vector for every instruction, up "
                        "to scale), so no metric can tell its instructions apart")
    return x


def one_direction(x: jax.Array) -> bool:
    """Whether every row of x (finite, no zero rows) has the same direction as the first, to within float32
    rounding (``SAME_DIRECTION_TOLERANCE`` per coordinate of the unit rows): a constant space, such as the
    first-token state of every instruction at a model's input layer."""
    return bool(_spread(x) <= SAME_DIRECTION_TOLERANCE)


@jax.jit
def _spread(x: jax.Array) -> jax.Array:
    u = unit_rows(x)
    return jnp.abs(u - u[0]).max()


def check_same_n(spaces: dict[str, jax.Array]) -> int:
    """The common number of instructions N, or an LvaaError naming the two spaces that disagree."""
    (first, x), *rest = spaces.items()
    for name, y in rest:
        if y.shape[0] != x.shape[0]:
            raise LvaaError(f"{name}: {y.shape[0]} instructions, but {first} has {x.shape[0]}; spaces are "
                            "compared over the same N instructions in the same order")
    return x.shape[0]


def check_k(k, n: int, what: str = "k") -> int:
    """``k`` as an int in [1, N-1] (an instruction has N-1 possible neighbours), else an LvaaError."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
        raise LvaaError(f"{what}={k!r}: must be an integer between 1 and N-1 = {n - 1} (N = {n} instructions)")
    return int(k)


@jax.jit
def _finite_and_norms(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.isfinite(x).all(), jnp.linalg.norm(x, axis=1)


@jax.jit
def unit_rows(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm: cosine similarity is then a dot product."""
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


@jax.jit
def centre(x: jax.Array) -> jax.Array:
    """x minus its mean row (``align.center``): the direction every instruction shares, which dominates
    decoder states (mean pairwise cosine ~0.9), no longer decides cosine similarities."""
    return x - x.mean(0)


def mean_cosine(x) -> float:
    """The mean cosine similarity over pairs of distinct rows (anisotropy: near 0 for isotropic spaces, near
    1 when every row shares one dominant direction), in O(N D) memory: with u the unit rows and s their sum,
    sum_{i != j} u_i . u_j = |s|^2 - N."""
    x = check_space(x)
    n = x.shape[0]
    total = np.asarray(_unit_sum(x), np.float64)
    return float((total @ total - n) / (n * (n - 1)))


@jax.jit
def _unit_sum(x: jax.Array) -> jax.Array:
    return unit_rows(x).sum(0)


@jax.jit
def clamp_outliers(x: jax.Array) -> jax.Array:
    """Clamps every entry to +-t, t = the mean over rows of each row's 95th percentile of |x|.

    This is the Platonic Representation Hypothesis code's ``remove_outliers``: a few LLM feature dimensions
    carry activations orders of magnitude above the rest and would otherwise dominate every cosine.
    """
    t = jnp.quantile(jnp.abs(x), CLAMP_QUANTILE, axis=1).mean()
    return jnp.clip(x, -t, t)
