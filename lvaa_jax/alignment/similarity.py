"""Companions to precision@k: orthogonal Procrustes, linear CKA (plain and debiased) and RSA.

Procrustes and CKA depend on a centred space only through rotation-invariant quantities, so both are computed
from each space's principal-component scores Z = X V (N x r, r = min(N, D), by decreasing variance), obtained
once per space from the smaller of its two Gram matrices. Reducing the wider of two spaces to the common width
by PCA is then keeping its first components, and the scores of all spaces, zero-padded to one width, share
one compiled pair kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lvaa_jax.alignment.knn import QUANTA_PER_UNIT, symmetric, upper_pairs
from lvaa_jax.alignment.spaces import check_same_n, check_space, unit_rows
from lvaa_jax.errors import LvaaError

MIN_N_UNBIASED = 4  # the unbiased HSIC divides by N (N - 3)

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


def _hsic(terms: np.ndarray, n: int, debiased: bool) -> float:
    """HSIC of a pair from its ``_pair_terms`` (up to a factor shared by all pairs): ||A^T B||_F^2, or with
    the unbiased estimator (Song et al. 2012) that removes CKA's upward bias at small N and large width, in
    float64 since its terms cancel."""
    _, xty, rows_dot, sum_a, sum_b = terms.astype(np.float64)
    return xty - n / (n - 2) * rows_dot + sum_a * sum_b / ((n - 1) * (n - 2)) if debiased else xty


def _own_hsic_positive(terms: np.ndarray, n: int, debiased: bool) -> bool:
    """Whether a space's HSIC with itself is positive beyond float32 rounding of its terms (the debiased
    estimate can be zero, e.g. for N = 4 points on a line, and its terms cancel)."""
    _, xty, rows_dot, sum_a, sum_b = np.abs(terms.astype(np.float64))
    scale = xty + n / (n - 2) * rows_dot + sum_a * sum_b / ((n - 1) * (n - 2)) if debiased else xty
    return _hsic(terms, n, debiased) > 1e-5 * scale


def _cka(ab: np.ndarray, aa: np.ndarray, bb: np.ndarray, n: int, debiased: bool) -> float:
    """Kornblith et al.'s feature-space linear CKA from ``_pair_terms`` of (a, b), (a, a) and (b, b); NaN
    where a space's own HSIC is not positive (the debiased estimate can be 0 at small N)."""
    if not (_own_hsic_positive(aa, n, debiased) and _own_hsic_positive(bb, n, debiased)):
        return float("nan")
    return float(_hsic(ab, n, debiased) / np.sqrt(_hsic(aa, n, debiased) * _hsic(bb, n, debiased)))


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
    """Pearson correlation of two rank vectors, in float64 (sums over N^2/2 terms); NaN if one is constant."""
    a = ranks_a.astype(np.float64) - ranks_a.mean()
    b = ranks_b.astype(np.float64) - ranks_b.mean()
    spread = a.dot(a) * b.dot(b)
    return float(a.dot(b) / np.sqrt(spread)) if spread > 0 else float("nan")


@functools.partial(jax.jit, static_argnames=("dims",))
def svcca_basis(x: jax.Array, dims: int) -> tuple[jax.Array, jax.Array]:
    """(float32[N, dims] orthonormal basis of the top ``dims`` left singular vectors of x, its centred
    columns scaled to unit standard deviation (+1e-8, ddof 1, as the Platonic Representation Hypothesis
    code's ``svcca`` does); the ratio of the dims-th to the first squared singular value). Exact, from the
    smaller Gram matrix, where that code uses a randomised ``torch.svd_lowrank``."""
    x = x - x.mean(0)
    x = x / (jnp.std(x, axis=0, ddof=1) + 1e-8)
    n, d = x.shape
    if d <= n:
        variances, axes = jnp.linalg.eigh(jnp.dot(x.T, x, precision=_HI))
        basis = jnp.linalg.qr(jnp.dot(x, axes[:, ::-1][:, :dims], precision=_HI))[0]
    else:
        variances, u = jnp.linalg.eigh(jnp.dot(x, x.T, precision=_HI))
        basis = u[:, ::-1][:, :dims]
    variances = variances[::-1]
    return basis, variances[dims - 1] / variances[0]


@jax.jit
def _canonical_mean(basis_a: jax.Array, basis_b: jax.Array) -> jax.Array:
    """Mean canonical correlation of two orthonormal bases of centred columns: the singular values of
    A^T B are the canonical correlations (what sklearn's iterative CCA converges to)."""
    return jnp.minimum(jnp.linalg.svd(jnp.dot(basis_a.T, basis_b, precision=_HI), compute_uv=False), 1).mean()


def _scores(spaces: Sequence[jax.Array]) -> list[jax.Array]:
    """Each space's PCA scores, zero-padded to the widest so that every pair shares one compiled kernel."""
    scores = [pca_scores(x) for x in spaces]
    width = max(z.shape[1] for z in scores)
    return [jnp.pad(z, ((0, 0), (0, width - z.shape[1]))) for z in scores]


def _terms(scores: Sequence[jax.Array], widths: Sequence[int], pairs: np.ndarray) -> np.ndarray:
    """float64[P, 5]: ``_pair_terms`` of every pair, the Procrustes width being the narrower space's."""
    terms = [_pair_terms(scores[a], scores[b], min(widths[a], widths[b])) for a, b in pairs]
    return np.asarray(terms, np.float64)


COMPANIONS = ("procrustes", "cka", "cka_debiased", "rsa", "svcca")
SVCCA_DIMS = 10  # the Platonic Representation Hypothesis code's cca_dim
SVCCA_MIN_RATIO = 1e-5  # below this ratio of squared singular values a direction is float32 noise


def _single(metric: str, a, b, **kwargs) -> float:
    """``metric`` between two spaces over the same instructions, or an LvaaError saying why it is undefined."""
    spaces = {"a": check_space(a, "a"), "b": check_space(b, "b")}
    check_same_n(spaces)
    units = [unit_rows(x) for x in spaces.values()]
    matrices, undefined = similarity_matrices(units, units, (metric,), **kwargs)
    for index, name in enumerate(spaces):
        if index in undefined[metric]:
            raise LvaaError(f"{metric} is undefined for {name}: {undefined[metric][index]}")
    return float(matrices[metric][0, 1])


def procrustes_similarity(a, b) -> float:
    """max over orthogonal R of <A, B R> for A, B the unit rows of a and b, centred and scaled to unit
    Frobenius norm: the nuclear norm of A^T B, in [0, 1], 1 iff B is a rotation of A. The wider space is
    first reduced to the other's width by PCA."""
    return _single("procrustes", a, b)


def linear_cka(a, b, *, debiased: bool = False) -> float:
    """Linear CKA between the unit rows of two spaces over the same instructions (1 for rotations); its value
    equals the Platonic Representation Hypothesis code's ``cka``/``unbiased_cka`` on the same unit rows
    (without its +1e-6 in the denominator). Debiased: needs N >= 4 and a positive HSIC of each space with
    itself, else an LvaaError."""
    return _single("cka_debiased" if debiased else "cka", a, b)


def rsa(a, b) -> float:
    """Representational similarity: Spearman correlation between the condensed cosine-distance matrices.

    Computed on similarities rounded to 1e-6, like the neighbours, so that identical rows tie exactly (ties
    get average ranks); Spearman of distances 1 - s equals Spearman of similarities s. Needs N >= 3 and
    N^2/2 memory; undefined (an LvaaError) for a space whose pairwise similarities are all equal.
    """
    return _single("rsa", a, b)


def svcca(a, b, *, dims: int = SVCCA_DIMS) -> float:
    """SVCCA (Raghu et al. 2017) as the Platonic Representation Hypothesis code computes it: unit rows, each
    feature centred and scaled to unit standard deviation, the top ``dims`` left singular vectors of each
    space, and the mean of their ``dims`` canonical correlations. Exact SVD and CCA where that code uses a
    randomised SVD and sklearn's iterative CCA. Needs N > dims and ``dims`` directions of variance in each
    space (the dims-th squared singular value above 1e-5 of the first), else an LvaaError."""
    return _single("svcca", a, b, svcca_dims=dims)


def similarity_matrices(spaces: Sequence[jax.Array], rsa_spaces: Sequence[jax.Array],
                        metrics: Sequence[str] = COMPANIONS, *,
                        svcca_dims: int = SVCCA_DIMS) -> tuple[dict[str, np.ndarray], dict[str, dict[int, str]]]:
    """float64[M, M] matrices of ``metrics`` (Procrustes, CKA, debiased CKA and SVCCA from ``spaces``, RSA from
    ``rsa_spaces``, which may be a subsample of instructions) for every pair of (unit-row) spaces, the
    per-space work (PCA, ranks, SVCCA bases) done once; and, per metric, the spaces it is undefined for, with
    the reason (their rows and columns are NaN)."""
    m, n = len(spaces), spaces[0].shape[0]
    pairs = upper_pairs(m)
    values, undefined = {}, {metric: {} for metric in metrics}
    if {"procrustes", "cka", "cka_debiased"} & set(metrics):
        terms = _terms(_scores(spaces), [x.shape[1] for x in spaces], pairs)
        own = {a: terms[p] for p, (a, b) in enumerate(pairs) if a == b}
        values["procrustes"] = terms[:, 0]
        for metric, debiased in (("cka", False), ("cka_debiased", True)):
            if metric not in metrics:
                continue
            if debiased and n < MIN_N_UNBIASED:
                undefined[metric] = dict.fromkeys(range(m), f"N = {n} instructions; the unbiased HSIC needs at "
                                                            f"least {MIN_N_UNBIASED} (it divides by N (N - 3))")
                values[metric] = np.full(len(pairs), np.nan)
                continue
            for a, terms_a in own.items():
                if not _own_hsic_positive(terms_a, n, debiased):
                    undefined[metric][a] = (f"its unbiased HSIC with itself is {_hsic(terms_a, n, True):.2g}, "
                                            f"not above 0 (too few instructions, N = {n}, for this estimator)")
            values[metric] = [_cka(t, own[a], own[b], n, debiased) for t, (a, b) in zip(terms, pairs, strict=True)]
    if "rsa" in metrics:
        n_rsa = rsa_spaces[0].shape[0]
        if n_rsa < 3:
            undefined["rsa"] = dict.fromkeys(range(m), f"N = {n_rsa} instructions; RSA correlates the N (N - 1) / 2 "
                                                       "pairwise similarities and needs at least 3")
            ranks = [np.zeros(1)] * m
        else:
            ranks = [np.asarray(doubled_ranks(condensed_similarities(x))) for x in rsa_spaces]
        for a, r in enumerate(ranks):
            if a not in undefined["rsa"] and r.min() == r.max():
                undefined["rsa"][a] = "all its pairwise similarities are equal (after rounding to 1e-6)"
        values["rsa"] = [_spearman(ranks[a], ranks[b]) for a, b in pairs]
    if "svcca" in metrics:
        if n <= svcca_dims:
            undefined["svcca"] = dict.fromkeys(range(m), f"N = {n} instructions; SVCCA keeps {svcca_dims} singular "
                                                         f"directions and needs N > {svcca_dims}")
            bases = [jnp.zeros((n, svcca_dims))] * m
        else:
            bases = []
            for a, x in enumerate(spaces):
                if x.shape[1] < svcca_dims:
                    undefined["svcca"][a] = f"its width {x.shape[1]} is below the {svcca_dims} directions SVCCA keeps"
                    bases.append(jnp.zeros((n, svcca_dims)))
                    continue
                basis, ratio = svcca_basis(x, svcca_dims)
                bases.append(basis)
                if not float(ratio) > SVCCA_MIN_RATIO:
                    undefined["svcca"][a] = (f"fewer than {svcca_dims} directions of variance (its {svcca_dims}th "
                                             f"squared singular value is {float(ratio):.2g} of the first)")
        values["svcca"] = [float(_canonical_mean(bases[a], bases[b])) for a, b in pairs]
    matrices = {}
    for metric in metrics:
        matrix = symmetric(m, pairs, np.asarray(values[metric], np.float64))
        bad = list(undefined[metric])
        matrix[bad, :] = np.nan
        matrix[:, bad] = np.nan
        matrices[metric] = matrix
    return matrices, undefined
