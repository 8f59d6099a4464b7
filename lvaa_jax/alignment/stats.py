"""Permutation null (of precision@k and the other kNN scores) and bootstrap intervals, both from neighbour
index sets computed once.

Random draws are indexed: draw i uses ``fold_in(key, i)``, so results do not depend on how draws are
chunked, and the same key gives the same null and intervals on any machine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lvaa_jax.alignment.knn import knn_indices, overlap_counts, overlap_totals
from lvaa_jax.alignment.spaces import check_k, check_same_n, check_space
from lvaa_jax.progress import progress_bar

_CHUNK_BYTES = 1 << 28  # per-chunk working set of the batched kernels
_MAX_CHUNK = 64  # draws per kernel call


def map_chunks(fn: Callable[[jax.Array], jax.Array], total: int, chunk: int, desc: str) -> np.ndarray:
    """``fn(ids)`` over ids 0..total-1, ``chunk`` at a time with a progress bar, concatenated on axis 0.

    The last chunk is padded to full size (its extra rows dropped), so ``fn`` compiles once whatever the
    total; callers pick ``chunk`` from memory alone for the same reason.
    """
    out = []
    with progress_bar(total=total, desc=desc, leave=False) as bar:
        for start in range(0, total, chunk):
            out.append(np.asarray(fn(jnp.arange(start, start + chunk)))[: total - start])
            bar.update(len(out[-1]))
    return np.concatenate(out)


def permutation_null(indices: jax.Array, pairs: np.ndarray, key: jax.Array, permutations: int,
                     score: Callable | None = None, similarities: jax.Array | None = None) -> np.ndarray:
    """[permutations, Q]: the score of every pair (a, b) of ``pairs`` after a random relabelling of the
    instructions of b. ``indices`` is the [T, N, k] stack of index sets, ``similarities`` the matching stack
    of similarities (for scores that read them). ``score(ia, va, ib, vb, pairs)`` scores pairs of stacks;
    the default is precision@k's total overlap (int32).

    Permuting b's instruction order by pi (row i of b' is row pi(i) of b) turns its neighbour sets into
    N_b'(i) = pi^-1(N_b(pi(i))): a gather of rows and a relabelling of values, no new similarity. This keeps
    b's neighbourhood graph exactly (the graph-isomorphism null); recomputing kNN on b' would differ only
    where a tie straddles the k-th neighbour, where b' would pick the tied neighbour by its new index.
    One permutation per draw (draw i: ``fold_in(key, i)``) is applied to every space's sets, so all pairs,
    and every score given the same key, are scored under the same relabellings.
    """
    t, n, k = indices.shape
    chunk = min(_MAX_CHUNK, max(1, _CHUNK_BYTES // (4 * n * k * (t + 4 * k))))  # relabelled sets, pair temps
    pairs = jnp.asarray(pairs)
    similarities = jnp.zeros((t, n, k)) if similarities is None else similarities
    return map_chunks(lambda ids: _null_chunk(indices, similarities, pairs, key, ids, score or _overlap),
                      permutations, chunk, "permutation null")


def _overlap(ia, va, ib, vb, pairs):
    return overlap_totals(ia, ib, pairs)


@functools.partial(jax.jit, static_argnames=("score",))
def _null_chunk(indices: jax.Array, similarities: jax.Array, pairs: jax.Array, key: jax.Array, ids: jax.Array,
                score: Callable) -> jax.Array:
    n = indices.shape[1]

    def one(i: jax.Array) -> jax.Array:
        perm = jax.random.permutation(jax.random.fold_in(key, i), n)
        inverse = jnp.zeros(n, jnp.int32).at[perm].set(jnp.arange(n, dtype=jnp.int32))
        return score(indices, similarities, inverse[indices[:, perm]], similarities[:, perm], pairs)

    return jax.vmap(one)(ids)


def p_values(raw: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided permutation p-values, (1 + #{null >= raw}) / (1 + draws), per column of ``null``."""
    return (1 + (null >= raw).sum(0)) / (1 + null.shape[0])


def bootstrap_means(counts: jax.Array, key: jax.Array, resamples: int) -> np.ndarray:
    """float[resamples, R]: the mean of each row of ``counts`` [R, N] over instructions resampled with
    replacement.

    Per-instruction overlaps are computed once on the full instruction set and resampled; neighbours are not
    recomputed inside a resample. This is the usual (and cheap) percentile bootstrap of precision@k: the
    interval covers which instructions are scored, given the full set's neighbourhood graphs. Recomputing
    neighbours per resample is not better defined here: a resample repeats instructions, and the exact ties
    between copies would decide their neighbours.
    """
    r, n = counts.shape
    chunk = min(_MAX_CHUNK, max(1, _CHUNK_BYTES // (8 * r * n)))
    return map_chunks(lambda ids: _bootstrap_chunk(counts, key, ids), resamples, chunk, "bootstrap")


@jax.jit
def _bootstrap_chunk(counts: jax.Array, key: jax.Array, ids: jax.Array) -> jax.Array:
    n = counts.shape[1]

    def weights(i: jax.Array) -> jax.Array:  # times each instruction is drawn
        draws = jax.random.randint(jax.random.fold_in(key, i), (n,), 0, n)
        return jnp.zeros(n, jnp.float32).at[draws].add(1.0)

    w = jax.vmap(weights)(ids)
    return jnp.dot(w, counts.T.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) / n


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentile interval of ``samples`` along axis 0."""
    tail = 50 * (1 - level)
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return low, high



def _pair_indices(a, b, k: int) -> jax.Array:
    """[2, N, k] neighbour sets of two checked spaces over the same instructions."""
    checked = {"a": check_space(a, "a"), "b": check_space(b, "b")}
    k = check_k(k, check_same_n(checked))
    return jnp.stack([knn_indices(x, k, name=name) for name, x in checked.items()])


def precision_null(a, b, k: int, *, key: jax.Array, permutations: int = 200) -> dict[str, float]:
    """precision@k of (a, b) with its permutation null: the null's mean (near chance, k/(N-1)), the calibrated
    score (raw minus that mean) and the one-sided p-value."""
    indices = _pair_indices(a, b, k)
    n = indices.shape[1]
    pair = np.asarray([[0, 1]], np.int32)
    raw = np.asarray(overlap_totals(indices, indices, jnp.asarray(pair)))
    null = permutation_null(indices, pair, key, permutations)
    precision, mean = float(raw[0]) / (n * k), float(null.mean()) / (n * k)
    return {"precision": precision, "null_mean": mean, "calibrated": precision - mean,
            "p_value": float(p_values(raw, null)[0])}


def precision_interval(a, b, k: int, *, key: jax.Array, resamples: int = 200,
                       level: float = 0.95) -> tuple[float, float]:
    """Bootstrap percentile interval of precision@k over instructions (see ``bootstrap_means``)."""
    indices = _pair_indices(a, b, k)
    counts = overlap_counts(indices, indices, jnp.asarray([[0, 1]], jnp.int32))
    low, high = percentile_interval(bootstrap_means(counts, key, resamples) / k, level)
    return float(low[0]), float(high[0])
