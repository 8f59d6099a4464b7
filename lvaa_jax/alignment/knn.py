"""k-nearest-neighbour index sets by cosine similarity, and precision@k (mutual kNN overlap) from them.

Neighbours are the one expensive step (an N x N similarity per space), so they are computed once per space
(per layer) and every score is then a cheap comparison of index sets: all M x M pairs, every layer pair, the
permutation null, the bootstrap and the k sweep read the same ``[N, K]`` arrays.

Ties. Identical instruction vectors are common here (bag-of-words spaces, input-embedding layers), and
float summation order would then decide their order. Similarities are therefore rounded to multiples of
1e-6 before top-k (float32 noise is ~1e-7, so copies tie again), and equal values go to the lower index
(``lax.top_k``'s documented tie rule): identical rows get the same neighbours whatever the device, block
size or backend, unless float noise straddles a rounding boundary (odds of about noise / 1e-6 per tie).
The order is total, so the top-k' for any k' < K is the first k' columns of the top-K: the whole k sweep
needs one neighbour search.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from lvaa_jax.alignment.spaces import check_k, check_same_n, check_space, unit_rows
from lvaa_jax.errors import LvaaError

QUANTA_PER_UNIT = 1_000_000  # similarities are rounded to multiples of 1e-6
AXIS = "data"


def default_block_size(n: int, num_devices: int, platform: str) -> int:
    """Query rows per block: the [block, N] float32 similarity tile stays within a per-device budget.

    On CPU ~500 rows already run the blockwise search as fast as one full x @ x.T (measured on 2 cores,
    N = 10 000 and 40 000); accelerators want large tiles for their matmul units and have the memory for
    them. The block then splits one device's rows into equal blocks (a multiple of 8), so padding stays small.
    """
    budget, cap = (1 << 28, 512) if platform == "cpu" else (1 << 31, 8192)
    largest = min(cap, max(64, budget // (4 * n)))
    per_device = -(-n // num_devices)
    blocks = -(-per_device // largest)
    return -(-per_device // (8 * blocks)) * 8


@functools.cache
def data_mesh(devices: tuple[jax.Device, ...]) -> Mesh:
    """A one-axis mesh (``data``) over ``devices``: rows of the neighbour search are split along it."""
    return Mesh(np.asarray(devices), (AXIS,))


def knn_indices(x, k: int, *, block_size: int | None = None, devices: Sequence[jax.Device] | None = None,
                name: str = "embeddings") -> jax.Array:
    """int32[N, k]: the k nearest neighbours of every row of ``x`` [N, D] by cosine similarity.

    The row itself is excluded; neighbours are sorted by decreasing quantised similarity, ties to the lower
    index. Computed blockwise (``block_size`` query rows at a time, default from N and the device), so peak
    memory is N * (block + k) per device besides x itself, and rows are split over ``devices`` (default: all).
    ``name`` labels the space in error messages.
    """
    x = check_space(x, name)
    n = x.shape[0]
    k = check_k(k, n)
    devices = tuple(jax.devices() if devices is None else devices)
    if block_size is None:
        block_size = default_block_size(n, len(devices), devices[0].platform)
    elif isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise LvaaError(f"block_size={block_size!r}: must be a positive integer")
    return _knn(x, k=k, block=int(block_size), mesh=data_mesh(devices))


@functools.partial(jax.jit, static_argnames=("k", "block", "mesh"))
def _knn(x: jax.Array, *, k: int, block: int, mesh: Mesh) -> jax.Array:
    # Queries are padded to a whole number of blocks on every device; padded rows match no column (their
    # global ids are >= N), and their results are cut off. Keys stay unpadded and replicated.
    n, d = x.shape
    x = unit_rows(x)
    rows_per_step = block * mesh.size
    queries = jnp.pad(x, ((0, -(-n // rows_per_step) * rows_per_step - n), (0, 0)))
    columns = jnp.arange(n)

    def device_rows(local: jax.Array, keys: jax.Array) -> jax.Array:
        first = lax.axis_index(AXIS) * local.shape[0]

        def one_block(args: tuple[jax.Array, jax.Array]) -> jax.Array:
            q, start = args
            sims = jnp.dot(q, keys.T, precision=lax.Precision.HIGHEST)
            quantised = jnp.round(sims * QUANTA_PER_UNIT)  # integers, exact in float32: |sims| <= 1
            rows = start + jnp.arange(block)
            quantised = jnp.where(columns[None, :] == rows[:, None], -jnp.inf, quantised)
            return lax.top_k(quantised, k)[1]

        blocks = local.reshape(-1, block, d)
        starts = first + block * jnp.arange(blocks.shape[0])
        return lax.map(one_block, (blocks, starts)).reshape(-1, k)

    spec = PartitionSpec(AXIS)
    search = jax.shard_map(device_rows, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=spec)
    return search(queries, x)[:n]


def _intersections(ia: jax.Array, ib: jax.Array) -> jax.Array:
    """int32[N]: |ia[i] ∩ ib[i]| per row; indices within a row are distinct, so equal pairs count once."""
    return (ia[:, :, None] == ib[:, None, :]).sum((1, 2), dtype=jnp.int32)


def _map_pairs(fn, ia: jax.Array, ib: jax.Array, pairs: jax.Array) -> jax.Array:
    """``fn(ia[p], ib[q])`` for every row (p, q) of ``pairs``, one pair at a time: each pair is already a
    fused reduction over N x k x k, and batching pairs with vmap would materialise [batch, N, k, k] (measured:
    3.5 GB and 5x slower for 36 pairs at N = 100 000)."""
    return lax.map(lambda pq: fn(ia[pq[0]], ib[pq[1]]), pairs)


@jax.jit
def overlap_counts(ia: jax.Array, ib: jax.Array, pairs: jax.Array) -> jax.Array:
    """int32[Q, N]: per-instruction overlap |N_a(i) ∩ N_b(i)| for every pair (a, b) of ``pairs`` [Q, 2],
    where a indexes the stack ``ia`` [T, N, k] and b the stack ``ib`` (the same stack, or a relabelled one)."""
    return _map_pairs(_intersections, ia, ib, pairs)


@jax.jit
def overlap_totals(ia: jax.Array, ib: jax.Array, pairs: jax.Array) -> jax.Array:
    """int32[Q]: ``overlap_counts`` summed over instructions, without keeping the [Q, N] counts."""
    return _map_pairs(lambda a, b: _intersections(a, b).sum(), ia, ib, pairs)


@functools.partial(jax.jit, static_argnames=("ks",))
def sweep_totals(indices: jax.Array, pairs: jax.Array, ks: tuple[int, ...]) -> jax.Array:
    """int32[Q, len(ks)]: total overlap at every k in ``ks`` from one [N, K] comparison per pair.

    Neighbour lists are prefixes of one total order, so element p of N_a(i) that sits at position q of N_b(i)
    is shared by both top-k' sets exactly when max(p, q) < k'.
    """
    big_k = indices.shape[-1]
    position = jnp.arange(big_k)
    later = jnp.maximum(position[:, None], position[None, :])
    ks_array = jnp.asarray(ks)

    def pair(ia: jax.Array, ib: jax.Array) -> jax.Array:
        shared_from = jnp.min(jnp.where(ia[:, :, None] == ib[:, None, :], later, big_k), axis=-1)
        return (shared_from[:, :, None] < ks_array).sum((0, 1), dtype=jnp.int32)

    return _map_pairs(pair, indices, indices, pairs)


def upper_pairs(m: int) -> np.ndarray:
    """int32[M(M+1)/2, 2]: the pairs (a, b), a <= b, row-major; the diagonal is scored like any pair."""
    a, b = np.triu_indices(m)
    return np.stack([a, b], 1).astype(np.int32)


def symmetric(m: int, pairs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[M, M] matrix from values on ``upper_pairs(m)``."""
    out = np.zeros((m, m), dtype=np.asarray(values).dtype)
    out[pairs[:, 0], pairs[:, 1]] = values
    out[pairs[:, 1], pairs[:, 0]] = values
    return out


def precision_at_k(a, b, k: int, *, block_size: int | None = None) -> float:
    """Mean over instructions i of |N_a(i) ∩ N_b(i)| / k: a and b hold the same N instructions in the same
    order (their widths may differ)."""
    _, matrix = precision_matrix({"a": a, "b": b}, k, block_size=block_size)
    return float(matrix[0, 1])


def precision_matrix(spaces: Mapping[str, object], k: int, *,
                     block_size: int | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """(names, float64[M, M]) precision@k between every pair of spaces: neighbours once per space, then all
    pairs from the index sets in one batched kernel."""
    if not spaces:
        raise LvaaError("precision_matrix: no spaces given")
    checked = {name: check_space(x, name) for name, x in spaces.items()}
    n = check_same_n(checked)
    k = check_k(k, n)
    indices = jnp.stack([knn_indices(x, k, block_size=block_size, name=name) for name, x in checked.items()])
    pairs = upper_pairs(len(checked))
    totals = np.asarray(overlap_totals(indices, indices, jnp.asarray(pairs)))
    return tuple(checked), symmetric(len(checked), pairs, totals / (n * k))


def precision_sweep(a, b, ks: Sequence[int], *, block_size: int | None = None) -> dict[int, float]:
    """precision@k for every k in ``ks`` from one neighbour search per space (at the largest k)."""
    checked = {"a": check_space(a, "a"), "b": check_space(b, "b")}
    n = check_same_n(checked)
    ks = tuple(sorted({check_k(k, n) for k in ks}))
    indices = jnp.stack([knn_indices(x, ks[-1], block_size=block_size, name=name)
                         for name, x in checked.items()])
    totals = np.asarray(sweep_totals(indices, jnp.asarray([[0, 1]], jnp.int32), ks))[0]
    return {k: float(t) / (n * k) for k, t in zip(ks, totals, strict=True)}
