"""Companions to precision@k: orthogonal Procrustes, linear CKA (plain and debiased) and RSA.

Procrustes and CKA depend on a centred space only through rotation-invariant quantities, so both are computed
from each space's principal-component scores Z = X V (N x r, r = min(N, D), by decreasing variance), obtained
once per space from the smaller of its two Gram matrices. Reducing the wider of two spaces to the common width
by PCA is then keeping its first components, and the scores of all spaces, zero-padded to one width, share
one compiled pair kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lvaa_jax.alignment.knn import QUANTA_PER_UNIT, symmetric, upper_pairs
from lvaa_jax.alignment.spaces import check_same_n, check_space, unit_rows

_HI = lax.Precision.HIGHEST


@jax.jit
def pca_scores(x: jax.Array) -> jax.Array:
    """float32[N, min(N, D)]: scores of the centred x on its principal axes, by decreasing variance."""
    x = x - x.mean(0)
    n, d = x.shape
    if d <= n:
        _, axes = jnp.linalg.eigh(jnp.dot(x.T, x, precision=_HI))
        return jnp.dot(x, axes[:, ::-1], precision=_HI)
    variances, u = jnp.linalg.eigh(jnp.dot(x, x.T, precision=_HI))
    return u[:, ::-1] * jnp.sqrt(jnp.maximum(variances[::-1], 0.0))


@jax.jit
def _pair_terms(za: jax.Array, zb: jax.Array, width: jax.Array) -> jax.Array:
    """float32[5] for two score matrices zero-padded to one width: the Procrustes similarity at ``width``
    components, ||A^T B||_F^2, the dot product of the squared row norms of A and B, and their sums (the
    terms of linear CKA, with (a, a) and (b, b) giving its normalisers)."""
    cross = jnp.dot(za.T, zb, precision=_HI)
    keep = jnp.arange(za.shape[1]) < width
    norms = jnp.sqrt(jnp.square(za).sum(0) @ keep) * jnp.sqrt(jnp.square(zb).sum(0) @ keep)
    nuclear = jnp.linalg.svd(jnp.where(keep[:, None] & keep[None, :], cross, 0.0), compute_uv=False).sum()
    rows_a, rows_b = jnp.square(za).sum(1), jnp.square(zb).sum(1)
    return jnp.stack([nuclear / norms, jnp.square(cross).sum(), rows_a @ rows_b, rows_a.sum(), rows_b.sum()])


def _cka(ab: np.ndarray, aa: np.ndarray, bb: np.ndarray, n: int, debiased: bool) -> float:
    """Kornblith et al.'s feature-space linear CKA from ``_pair_terms`` of (a, b), (a, a) and (b, b).

    Debiased: with the unbiased HSIC estimator (Song et al. 2012), which removes CKA's upward bias at small N
    and large width. Combined in float64, since the debiased terms cancel.
    """

    def hsic(terms: np.ndarray) -> float:
        _, xty, rows_dot, sum_a, sum_b = terms.astype(np.float64)
        return xty - n / (n - 2) * rows_dot + sum_a * sum_b / ((n - 1) * (n - 2)) if debiased else xty

    return float(hsic(ab) / np.sqrt(hsic(aa) * hsic(bb)))


@jax.jit
def condensed_similarities(x: jax.Array) -> jax.Array:
    """float32[N(N-1)/2]: cosine similarities of the pairs i < j, rounded to multiples of 1e-6 (as integers)."""
    x = unit_rows(x)
    i, j = jnp.triu_indices(x.shape[0], 1)
    return jnp.round(jnp.dot(x, x.T, precision=_HI) * QUANTA_PER_UNIT)[i, j]


@jax.jit
def doubled_ranks(values: jax.Array) -> jax.Array:
    """int32: twice the 1-based rank of each value; ties share their mean rank (Spearman's convention), kept
    integral by the factor 2 (float32 could not hold half ranks beyond 2^23 values)."""
    order = jnp.argsort(values, stable=True)
    ordered = values[order]
    position = jnp.arange(values.shape[0], dtype=jnp.int32)
    group = jnp.cumsum(jnp.concatenate([jnp.ones(1, bool), ordered[1:] != ordered[:-1]])) - 1
    first = jax.ops.segment_min(position, group, values.shape[0], indices_are_sorted=True)
    last = jax.ops.segment_max(position, group, values.shape[0], indices_are_sorted=True)
    return jnp.zeros_like(position).at[order].set((first + last)[group] + 2)


def _spearman(ranks_a: np.ndarray, ranks_b: np.ndarray) -> float:
    """Pearson correlation of two rank vectors, in float64 (sums over N^2/2 terms)."""
    a = ranks_a.astype(np.float64) - ranks_a.mean()
    b = ranks_b.astype(np.float64) - ranks_b.mean()
    return float(a.dot(b) / np.sqrt(a.dot(a) * b.dot(b)))


def _scores(spaces: Sequence[jax.Array]) -> list[jax.Array]:
    """Each space's PCA scores, zero-padded to the widest so that every pair shares one compiled kernel."""
    scores = [pca_scores(x) for x in spaces]
    width = max(z.shape[1] for z in scores)
    return [jnp.pad(z, ((0, 0), (0, width - z.shape[1]))) for z in scores]


def _terms(scores: Sequence[jax.Array], widths: Sequence[int], pairs: np.ndarray) -> np.ndarray:
    """float64[P, 5]: ``_pair_terms`` of every pair, the Procrustes width being the narrower space's."""
    terms = [_pair_terms(scores[a], scores[b], min(widths[a], widths[b])) for a, b in pairs]
    return np.asarray(terms, np.float64)


def _checked(a, b) -> list[jax.Array]:
    spaces = {"a": check_space(a, "a"), "b": check_space(b, "b")}
    check_same_n(spaces)
    return list(spaces.values())


def procrustes_similarity(a, b) -> float:
    """max over orthogonal R of <A, B R> for centred A, B of unit Frobenius norm: the nuclear norm of A^T B,
    in [0, 1], 1 iff B is a rotation (and scaling) of A. The wider space is first reduced to the other's width
    by PCA."""
    spaces = _checked(a, b)
    return float(_terms(_scores(spaces), [x.shape[1] for x in spaces], np.asarray([[0, 1]]))[0, 0])


def linear_cka(a, b, *, debiased: bool = False) -> float:
    """Linear CKA between two spaces over the same instructions (1 for rotations and scalings)."""
    spaces = _checked(a, b)
    ab, aa, bb = _terms(_scores(spaces), [x.shape[1] for x in spaces], np.asarray([[0, 1], [0, 0], [1, 1]]))
    return _cka(ab, aa, bb, spaces[0].shape[0], debiased)


def rsa(a, b) -> float:
    """Representational similarity: Spearman correlation between the condensed cosine-distance matrices.

    Computed on similarities rounded to 1e-6, like the neighbours, so that identical rows tie exactly (ties
    get average ranks); Spearman of distances 1 - s equals Spearman of similarities s. Needs N^2/2 memory.
    """
    return _spearman(*(np.asarray(doubled_ranks(condensed_similarities(x))) for x in _checked(a, b)))


def similarity_matrices(spaces: Sequence[jax.Array], rsa_spaces: Sequence[jax.Array]) -> dict[str, np.ndarray]:
    """float64[M, M] Procrustes, CKA, debiased CKA (from ``spaces``) and RSA (from ``rsa_spaces``, which may
    be a subsample of instructions) for every pair; the per-space work (PCA, ranks) is done once."""
    m, n = len(spaces), spaces[0].shape[0]
    pairs = upper_pairs(m)
    terms = _terms(_scores(spaces), [x.shape[1] for x in spaces], pairs)
    own = {a: terms[p] for p, (a, b) in enumerate(pairs) if a == b}
    ranks = [np.asarray(doubled_ranks(condensed_similarities(x))) for x in rsa_spaces]
    values = {
        "procrustes": terms[:, 0],
        "cka": [_cka(t, own[a], own[b], n, False) for t, (a, b) in zip(terms, pairs, strict=True)],
        "cka_debiased": [_cka(t, own[a], own[b], n, True) for t, (a, b) in zip(terms, pairs, strict=True)],
        "rsa": [_spearman(ranks[a], ranks[b]) for a, b in pairs],
    }
    return {name: symmetric(m, pairs, np.asarray(v)) for name, v in values.items()}
