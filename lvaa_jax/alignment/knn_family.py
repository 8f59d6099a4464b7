"""The Platonic Representation Hypothesis code's kNN metrics besides mutual kNN: cycle kNN, LCS kNN, edit
distance kNN and CKNNA (Huh et al. 2024, github.com/minyoungg/platonic-rep, ``metrics.py``).

Each reads the neighbour lists that ``nearest_neighbours`` computes once per space, so they share precision@k's
cosine similarity on unit rows, its self-exclusion and its tie rule (similarities rounded to 1e-6, equal
values to the lower index). That code ranks with ``argsort``/``topk`` on unrounded similarities and leaves
ties to PyTorch; this is the one deviation in the neighbour lists. Every score is a mean over instructions of
a quantity read from the two lists of each instruction (CKNNA: from the lists and the similarities on them),
so the permutation null relabels lists exactly as for precision@k (``stats.permutation_null``).

- cycle kNN (a, b): the fraction of instructions i that are among the a-neighbours of one of their
  b-neighbours (their ``knn_A[knn_B]`` contains i). Not symmetric.
- LCS kNN: the mean length of the longest common subsequence of the two ordered lists, in [0, k] (that code
  does not divide by k).
- edit distance kNN: 1 - mean Levenshtein distance between the two ordered lists / k.
- CKNNA: CKA whose kernels keep only the pairs (i, j) with j a neighbour of i in both spaces, with the
  unbiased HSIC of Song et al. (2012), as that code does; it needs N >= 4 and k >= 2. Its normalisers (a
  space against itself) can be zero or negative, where CKNNA is undefined; that code adds 1e-6 to the
  denominator, which we do not.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lvaa_jax.alignment.knn import _map_pairs, nearest_neighbours
from lvaa_jax.alignment.similarity import MIN_N_UNBIASED
from lvaa_jax.alignment.spaces import check_k, check_same_n, check_space
from lvaa_jax.alignment.stats import permutation_null
from lvaa_jax.errors import LvaaError


# ------------------------------------------------------------------------------------- per instruction
def cycle_hits(ia: jax.Array, ib: jax.Array) -> jax.Array:
    """int32[N]: 1 where instruction i is an a-neighbour of one of its b-neighbours."""
    me = jnp.arange(ia.shape[0], dtype=ia.dtype)[:, None, None]
    return (ia[ib] == me).any((1, 2)).astype(jnp.int32)


def lcs_lengths(ia: jax.Array, ib: jax.Array) -> jax.Array:
    """int32[N]: length of the longest common subsequence of the ordered lists ia[i] and ib[i].

    The dynamic programme's rows are scanned; within a row, L[p][q] = max(L[p-1][q], max over q' <= q of
    L[p-1][q'-1] + [a_p = b_q']), a running maximum (L is non-decreasing along q), so each row is a few
    vectorised ops over all instructions.
    """
    n, k = ia.shape
    match = (ia[:, :, None] == ib[:, None, :]).astype(jnp.int32)  # [N, p, q]
    zero = jnp.zeros((n, 1), jnp.int32)

    def row(previous, matches):
        reach = lax.cummax(previous[:, :-1] + matches, axis=1)
        return jnp.concatenate([zero, jnp.maximum(previous[:, 1:], reach)], 1), None

    table, _ = lax.scan(row, jnp.zeros((n, k + 1), jnp.int32), jnp.moveaxis(match, 1, 0))
    return table[:, -1]


def edit_distances(ia: jax.Array, ib: jax.Array) -> jax.Array:
    """int32[N]: Levenshtein distance (unit insertions, deletions, substitutions) between ia[i] and ib[i].

    Row by row as for the LCS: E[p][q] = min over q' <= q of c[q'] + (q - q'), where c[q'] is the best way
    into (p, q') from row p - 1 (c[0] = p), so E[p][q] - q is a running minimum of c[q'] - q'.
    """
    n, k = ia.shape
    mismatch = (ia[:, :, None] != ib[:, None, :]).astype(jnp.int32)
    q = jnp.arange(k + 1, dtype=jnp.int32)

    def row(previous, step):
        p, cost = step
        into = jnp.minimum(previous[:, 1:] + 1, previous[:, :-1] + cost)
        into = jnp.concatenate([jnp.full((n, 1), p, jnp.int32), into], 1)
        return lax.cummin(into - q, axis=1) + q, None

    steps = (jnp.arange(1, k + 1, dtype=jnp.int32), jnp.moveaxis(mismatch, 1, 0))
    table, _ = lax.scan(row, jnp.broadcast_to(q, (n, k + 1)), steps)
    return table[:, -1]


# ------------------------------------------------------------------------------------- the scores
@dataclasses.dataclass(frozen=True)
class ListMetric:
    """A kNN metric that is a mean over instructions of ``per_instruction(ia, ib)``, mapped to its scale."""

    name: str
    per_instruction: Callable[[jax.Array, jax.Array], jax.Array]
    symmetric: bool
    scale: Callable[[np.ndarray, int, int], np.ndarray]  # (totals, N, k) -> scores; higher = more alike
    title: str


LIST_METRICS = {
    m.name: m for m in (
        ListMetric("cycle_knn", cycle_hits, False, lambda t, n, k: t / n,
                   "Cycle kNN (is i an a-neighbour of one of its b-neighbours?)"),
        ListMetric("lcs_knn", lcs_lengths, True, lambda t, n, k: t / n,
                   "LCS kNN (mean longest common subsequence of the ordered lists, in [0, k])"),
        ListMetric("edit_distance_knn", edit_distances, True, lambda t, n, k: 1 - t / (n * k),
                   "Edit distance kNN (1 - mean Levenshtein distance / k)"),
    )
}


def _list_score(name: str) -> Callable:
    """``list_totals`` of metric ``name`` with the signature ``stats.permutation_null`` scores take."""
    return lambda ia, va, ib, vb, pairs: list_totals(ia, ib, pairs, name)


def _cknna_score(ia, va, ib, vb, pairs):
    return cknna_terms(ia, va, ib, vb, pairs)


@functools.partial(jax.jit, static_argnames=("name",))
def list_totals(ia: jax.Array, ib: jax.Array, pairs: jax.Array, name: str) -> jax.Array:
    """int32[Q]: ``LIST_METRICS[name]``'s per-instruction quantity summed over instructions, for every pair
    (a, b) of ``pairs`` [Q, 2] (a indexes the stack ``ia`` [T, N, k], b the stack ``ib``)."""
    fn = LIST_METRICS[name].per_instruction
    return _map_pairs(lambda a, b: fn(a, b).sum(dtype=jnp.int32), ia, ib, pairs)


LIST_SCORES = {name: _list_score(name) for name in LIST_METRICS}  # one function each: compiled once


def masked_hsic(ia: jax.Array, va: jax.Array, ib: jax.Array, vb: jax.Array) -> jax.Array:
    """float32[3]: the three terms of N (N - 3) times the unbiased HSIC of (M * K, M * L), K and L the cosine
    similarities of spaces a and b, M[i, j] = 1 where j is among i's neighbours in both (``ia``, ``ib``
    [N, k]; ``va``, ``vb`` the similarities on those lists). With K~, L~ the masked kernels (their
    diagonals are 0 already): sum(K~ * L~^T), sum(K~) sum(L~) / ((N-1)(N-2)) and 2 sum(K~ L~) / (N-2); the
    HSIC is the first plus the second minus the third (``hsic_from_terms``).

    Entries of K~ and L~ are held at the positions of a's lists: row i, column ia[i, p]."""
    n = ia.shape[0]
    me = jnp.arange(n, dtype=ia.dtype)[:, None, None]
    same = ia[:, :, None] == ib[:, None, :]  # [N, p, q]
    k_masked = jnp.where(same.any(2), va, 0.0)  # K~[i, ia[i, p]]
    l_masked = jnp.where(same, vb[:, None, :], 0.0).sum(2)  # L~[i, ia[i, p]]
    # L~[j, i] for j = ia[i, p]: nonzero when i is a neighbour of j in both spaces; L[j, i] from j's b list.
    j = ia
    in_a = (ia[j] == me).any(2)
    l_back = jnp.where(in_a, jnp.where(ib[j] == me, vb[j], 0.0).sum(2), 0.0)
    trace = (k_masked * l_back).sum()
    column_sums_k = jax.ops.segment_sum(k_masked.ravel(), ia.ravel(), n)
    cross = column_sums_k @ l_masked.sum(1)
    return jnp.stack([trace, k_masked.sum() * l_masked.sum() / ((n - 1) * (n - 2)), 2 * cross / (n - 2)])


@jax.jit
def cknna_terms(ia: jax.Array, va: jax.Array, ib: jax.Array, vb: jax.Array, pairs: jax.Array) -> jax.Array:
    """float32[Q, 3]: ``masked_hsic`` of every pair (a, b) of ``pairs`` over the stacks ``ia``/``va``
    [T, N, k] (a) and ``ib``/``vb`` (b)."""
    return lax.map(lambda pq: masked_hsic(ia[pq[0]], va[pq[0]], ib[pq[1]], vb[pq[1]]), pairs)


def hsic_from_terms(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(HSIC, whether it is positive beyond float32 rounding) from ``masked_hsic`` terms [..., 3], in
    float64: the terms cancel, and the estimate can be 0 or below (too few mutual neighbour pairs)."""
    terms = np.asarray(terms, np.float64)
    value = terms[..., 0] + terms[..., 1] - terms[..., 2]
    return value, value > 1e-5 * np.abs(terms).sum(-1)


def cknna_from_terms(cross: np.ndarray, own_a: np.ndarray, own_b: np.ndarray) -> np.ndarray:
    """CKNNA from ``masked_hsic`` terms of (a, b), (a, a) and (b, b); NaN where a space's own HSIC is not
    positive (CKNNA is undefined there)."""
    (a, defined_a), (b, defined_b) = hsic_from_terms(own_a), hsic_from_terms(own_b)
    defined = defined_a & defined_b
    return np.where(defined, hsic_from_terms(cross)[0] / np.sqrt(np.where(defined, a * b, 1.0)), np.nan)


def _cknna_undefined(own: np.ndarray, n: int) -> str | None:
    value, positive = hsic_from_terms(own)
    return None if positive else (f"its kNN-masked unbiased HSIC with itself is {value:.2g}, not above 0 (too "
                                  f"few mutual neighbour pairs among N = {n} instructions)")


# ------------------------------------------------------------------------------------- two spaces
def _pair_lists(a, b, k: int, *, block_size: int | None) -> tuple[jax.Array, jax.Array, int, int]:
    """Stacked (similarities, indices) [2, N, k] of two checked spaces over the same instructions."""
    checked = {"a": check_space(a, "a"), "b": check_space(b, "b")}
    n = check_same_n(checked)
    k = check_k(k, n)
    found = [nearest_neighbours(x, k, block_size=block_size, name=name) for name, x in checked.items()]
    return jnp.stack([v for v, _ in found]), jnp.stack([i for _, i in found]), n, k


def _list_metric(name: str, a, b, k: int, block_size: int | None) -> float:
    _, ids, n, k = _pair_lists(a, b, k, block_size=block_size)
    total = np.asarray(list_totals(ids, ids, jnp.asarray([[0, 1]], jnp.int32), name))
    return float(LIST_METRICS[name].scale(total.astype(np.float64), n, k)[0])


def cycle_knn(a, b, k: int, *, block_size: int | None = None) -> float:
    """Fraction of instructions that are among the a-neighbours of one of their b-neighbours (cycle kNN of
    the Platonic Representation Hypothesis code, with our tie rule). a, b: [N, D_a], [N, D_b]."""
    return _list_metric("cycle_knn", a, b, k, block_size)


def lcs_knn(a, b, k: int, *, block_size: int | None = None) -> float:
    """Mean length of the longest common subsequence of the two ordered k-neighbour lists, in [0, k]."""
    return _list_metric("lcs_knn", a, b, k, block_size)


def edit_distance_knn(a, b, k: int, *, block_size: int | None = None) -> float:
    """1 - mean Levenshtein distance between the two ordered k-neighbour lists / k, in [0, 1]."""
    return _list_metric("edit_distance_knn", a, b, k, block_size)


def check_cknna(n: int, k: int) -> None:
    """An LvaaError unless CKNNA is defined for N instructions and k neighbours."""
    if n < MIN_N_UNBIASED:
        raise LvaaError(f"CKNNA needs at least {MIN_N_UNBIASED} instructions (its unbiased HSIC divides by "
                        f"N (N - 3)), got N = {n}")
    if k < 2:
        raise LvaaError(f"CKNNA needs k >= 2 (as in the Platonic Representation Hypothesis code), got k = {k}")


def cknna(a, b, k: int, *, block_size: int | None = None) -> float:
    """CKNNA (Huh et al. 2024): unbiased linear CKA restricted to the pairs that are k-nearest neighbours in
    both spaces, on unit rows, from the neighbour lists (similarities rounded to 1e-6 as the search ranks
    them). An LvaaError where it is undefined (N < 4, k < 2, or a space's own HSIC not above 0)."""
    values, ids, n, k = _pair_lists(a, b, k, block_size=block_size)
    check_cknna(n, k)
    terms = np.asarray(cknna_terms(ids, values, ids, values, jnp.asarray([[0, 1], [0, 0], [1, 1]], jnp.int32)))
    for name, own in (("a", terms[1]), ("b", terms[2])):
        if reason := _cknna_undefined(own, n):
            raise LvaaError(f"cknna is undefined for {name}: {reason}")
    return float(cknna_from_terms(terms[0], terms[1], terms[2]))


# ------------------------------------------------------------------------------------- the stage's matrices
def family_matrices(indices: jax.Array, similarities: jax.Array, rows: np.ndarray, key: jax.Array,
                    permutations: int) -> tuple[dict[str, np.ndarray], dict[str, dict[int, str]]]:
    """float64[M, M] matrices, [a, b] = metric(space a, space b), of every list metric and CKNNA for the
    spaces at rows ``rows`` of the [T, N, k] stacks ``indices`` and ``similarities``; each metric also as
    ``<metric>_null_mean``, ``_calibrated`` (raw minus the null mean) and ``_p_value`` from
    ``permutations`` relabellings drawn from ``key`` (draw i is the same relabelling as precision@k's draw i
    under the same key). Also, per metric, the spaces it is undefined for, with the reason (NaN there)."""
    m = len(rows)
    _, n, k = indices.shape
    ordered = np.argwhere(np.ones((m, m), bool)).astype(np.int32)
    upper = np.stack(np.triu_indices(m), 1).astype(np.int32)
    matrices, undefined = {}, {}

    def add(name: str, pairs: np.ndarray, raw: np.ndarray, null: np.ndarray, symmetric: bool) -> None:
        def fill(values: np.ndarray) -> np.ndarray:
            out = np.full((m, m), np.nan)
            out[pairs[:, 0], pairs[:, 1]] = values
            if symmetric:
                out[pairs[:, 1], pairs[:, 0]] = values
            return out

        mean = null.mean(0)
        p = np.where(np.isnan(raw), np.nan, (1 + (null >= raw).sum(0)) / (1 + null.shape[0]))
        for suffix, values in (("", raw), ("_null_mean", mean), ("_calibrated", raw - mean), ("_p_value", p)):
            matrices[name + suffix] = fill(values)

    for name, metric in LIST_METRICS.items():
        pairs = upper if metric.symmetric else ordered
        on_rows = rows[pairs].astype(np.int32)
        raw = metric.scale(np.asarray(list_totals(indices, indices, jnp.asarray(on_rows), name), np.float64), n, k)
        null = permutation_null(indices, on_rows, key, permutations, LIST_SCORES[name])
        add(name, pairs, raw, metric.scale(null.astype(np.float64), n, k), metric.symmetric)
        undefined[name] = {}

    on_rows = rows[ordered].astype(np.int32)
    if k < 2:
        undefined["cknna"] = dict.fromkeys(range(m), f"k = {k}; CKNNA needs k >= 2")
        add("cknna", ordered, np.full(len(ordered), np.nan), np.full((1, len(ordered)), np.nan), False)
        return matrices, undefined
    terms = np.asarray(cknna_terms(indices, similarities, indices, similarities, jnp.asarray(on_rows)), np.float64)
    own = terms[ordered[:, 0] == ordered[:, 1]]
    undefined["cknna"] = {a: reason for a in range(m) if (reason := _cknna_undefined(own[a], n))}
    own_a, own_b = own[ordered[:, 0]], own[ordered[:, 1]]
    null = permutation_null(indices, on_rows, key, permutations, _cknna_score, similarities)
    add("cknna", ordered, cknna_from_terms(terms, own_a, own_b), cknna_from_terms(null, own_a, own_b), False)
    return matrices, undefined
