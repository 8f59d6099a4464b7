"""k-nearest-neighbour index sets by cosine similarity, and precision@k (mutual kNN overlap) from them.

Neighbours are the one expensive step (an N x N similarity per space), so they are computed once per space
(per layer) and every score is then a cheap comparison of index sets: all M x M pairs, every layer pair, the
permutation null, the bootstrap and the k sweep read the same ``[N, K]`` arrays.

Ties. Identical instruction vectors are common here (bag-of-words spaces, input-embedding layers), and
float summation order would then decide their order. Similarities are therefore rounded to multiples of
1e-6 before top-k (float32 noise is ~1e-7, so copies tie again), and equal values go to the lower index
(``lax.top_k``'s documented tie rule within a tile, and the same rule wherever lists merge): identical rows
get the same neighbours whatever the device, tile size or backend, unless float noise straddles a rounding
boundary (odds of about noise / 1e-6 per tie). The order is total, so the top-k' for any k' < K is the
first k' columns of the top-K: the whole k sweep needs one neighbour search.
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


def default_block_size(n: int, d: int, num_devices: int, platform: str) -> int:
    """Side of the square similarity tiles: ``block`` x ``block`` float32 per step.

    Larger tiles waste more matmul on the diagonal tiles (about block / 4N of it), and on CPU each row of
    each tile costs two top-k calls of about 1 us on one thread, so the best tile depends on D. Measured on
    this project's 2-core machine: at D = 384, where the top-k is a large share, tiles of N / 5 rows up to
    8 192; at D = 4 096, where the matmul is nearly all of it, N / 10 rows between 1 024 and 2 048 (at
    10 000 rows, 1 000-row tiles took 3% less CPU time than 2 000-row ones, and 8% less before diagonal
    tiles were split). Accelerators want large tiles for their matmul units. With several
    devices there are at least 2 blocks per device, so the tiles, which devices share out, number at least
    ~2 per device. A multiple of 8, splitting N into equal blocks.
    """
    if platform == "cpu":
        block = min(8192, max(1024, -(-n // 5))) if d < 1024 else min(2048, max(1024, -(-n // 10)))
    else:
        block = 8192
    blocks = max(-(-n // block), min(2 * num_devices, -(-n // 8)) if num_devices > 1 else 1)
    return -(-n // (8 * blocks)) * 8


@functools.cache
def data_mesh(devices: tuple[jax.Device, ...]) -> Mesh:
    """A one-axis mesh (``data``) over ``devices``: the tiles of the neighbour search are shared out along it."""
    return Mesh(np.asarray(devices), (AXIS,))


def knn_indices(x, k: int, *, block_size: int | None = None, devices: Sequence[jax.Device] | None = None,
                name: str = "embeddings") -> jax.Array:
    """int32[N, k]: the k nearest neighbours of every row of ``x`` [N, D] by cosine similarity.

    The row itself is excluded; neighbours are sorted by decreasing quantised similarity, ties to the lower
    index. Computed on ``block_size`` x ``block_size`` tiles of the similarity matrix (default from N and
    the device), so peak memory is N * k + block^2 per device besides x itself, and the tiles are split over
    ``devices`` (default: all). ``name`` labels the space in error messages.
    """
    return nearest_neighbours(x, k, block_size=block_size, devices=devices, name=name)[1]


def nearest_neighbours(x, k: int, *, block_size: int | None = None, devices: Sequence[jax.Device] | None = None,
                       name: str = "embeddings") -> tuple[jax.Array, jax.Array]:
    """(float32[N, k] similarities, int32[N, k] indices): ``knn_indices`` with the cosine similarity of each
    listed neighbour, rounded to 1e-6 as the search ranks them (what CKNNA reads)."""
    x = check_space(x, name)
    n = x.shape[0]
    k = check_k(k, n)
    devices = tuple(jax.devices() if devices is None else devices)
    if block_size is None:
        block_size = default_block_size(n, x.shape[1], len(devices), devices[0].platform)
    elif isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise LvaaError(f"block_size={block_size!r}: must be a positive integer")
    values, ids = _knn(x, k=k, block=int(block_size), mesh=data_mesh(devices))
    return values / QUANTA_PER_UNIT, ids


def _best(values: jax.Array, ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k best (quantised similarity, column id) of each row of [R, C] candidates in any order: higher
    similarity first, then the lower id."""
    negated, ids = lax.sort((-values, ids), dimension=1, num_keys=2)
    return -negated[:, :k], ids[:, :k]


def _merge_later(best: tuple[jax.Array, jax.Array], offered: tuple[jax.Array, jax.Array], k: int):
    """``_best`` of two lists that are each in that order already, where every id offered is above every id
    in ``best`` (so ``best`` wins ties): each entry's place in the merged list is its place in its own list
    plus the number of entries of the other list that go before it. Elementwise on [R, k, k], which fuses;
    a sort per row costs several times more on CPU (measured)."""
    (best_values, best_ids), (offered_values, offered_ids) = best, offered
    best_place = jnp.arange(best_values.shape[1]) + (offered_values[:, None, :] > best_values[:, :, None]).sum(-1)
    offered_place = (jnp.arange(offered_values.shape[1])
                     + (best_values[:, None, :] >= offered_values[:, :, None]).sum(-1))
    slots = jnp.arange(k)

    def placed(place, values, ids):
        at = place[:, :, None] == slots  # [R, entries, k]: entry -> slot
        return jnp.where(at, values[:, :, None], -jnp.inf).max(1), jnp.where(at, ids[:, :, None], 0).sum(1)

    (v1, i1), (v2, i2) = placed(best_place, best_values, best_ids), placed(offered_place, offered_values, offered_ids)
    return jnp.maximum(v1, v2), i1 + i2


def group_size(block: int, k: int) -> int:
    """Entries per group of the two-level top-k over ``block`` entries (1: a plain top-k).

    A two-level top-k costs one top-k over the block / g group maxima and one over the k g entries of the
    k best groups, so g ~ sqrt(block / k) balances the two; g divides the block.
    """
    target = max(1, round((block / k) ** 0.5))
    g = next(g for g in range(target, 0, -1) if block % g == 0)
    return g if g > 1 and k * g < block else 1


def _offer(sims: jax.Array, other: jax.Array, k: int, columns: bool) -> tuple[jax.Array, jax.Array]:
    """The k best (quantised similarity, id) that a [B, B] tile of similarities (-inf where masked) offers
    each of its rows, or each of its columns when ``columns``; ``other`` holds the ids along the other axis.
    Best first, ties to the lower id.

    Two-level where the tile allows it (``group_size``), and exact: the k groups of g consecutive entries
    with the highest maxima (ties to the lower group) hold the top k, since each of the k groups ranked
    above any other group holds an entry that beats all of that group's entries. Their k g entries,
    gathered in id order, go through a top-k of their own. XLA:CPU's top-k runs on one thread at about 1 us
    per row plus 3 ns per entry (measured), whereas the group maxima are one vectorised pass over the tile:
    a row's top-k reads ~2 sqrt(k B) entries instead of B. Columns are read where they lie, never from a
    transposed copy. Rounding commutes with the maximum, so only maxima and candidates are rounded.
    """
    b = sims.shape[0]
    g = group_size(b, k)
    if g == 1:
        values, at = lax.top_k(jnp.round((sims.T if columns else sims) * QUANTA_PER_UNIT), min(k, b))
        return values, other[at]  # a tile row may be shorter than k
    if columns:
        maxima = sims.reshape(b // g, g, b).max(1).T
    else:
        maxima = sims.reshape(b, b // g, g).max(2)
    groups = jnp.sort(lax.top_k(jnp.round(maxima * QUANTA_PER_UNIT), k)[1], axis=1)  # [B, k]
    if columns:
        picked = jnp.take_along_axis(sims.reshape(b // g, g, b), groups.T[:, None, :], axis=0)  # [k, g, B]
        picked = picked.reshape(k * g, b).T
    else:
        picked = jnp.take_along_axis(sims.reshape(b, b // g, g), groups[:, :, None], axis=1).reshape(b, k * g)
    values, at = lax.top_k(jnp.round(picked * QUANTA_PER_UNIT), k)
    return values, other[groups[jnp.arange(b)[:, None], at // g] * g + at % g]


@functools.partial(jax.jit, static_argnames=("k", "block", "mesh"))
def _knn(x: jax.Array, *, k: int, block: int, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    # The similarity matrix is symmetric, so only its tiles (a, b) with a <= b are computed: each tile offers
    # its rows' neighbours to block a and its columns' neighbours to block b: half the matmul FLOPs of a
    # row-by-row search. Devices take equal shares of the tiles, keep a running top-k of every row, and
    # their lists are merged at the end. Tiles run in row-major order, so each block is offered candidates
    # in increasing column order (blocks c < b from tiles (c, b), then b, b + 1, ... from tiles (b, .)) and
    # a device merges lists cheaply (``_merge_later``). A diagonal tile is symmetric too, so it is computed
    # as three half tiles (its upper-left, upper-right and lower-right quarters, which keeps that order):
    # the matmul wasted on diagonal tiles is then a quarter tile, not half. Rows are padded to a whole
    # number of blocks. The diagonal and the padded columns are set to -inf in the tiles that hold them,
    # which never enters a final list (every row has N - 1 >= k finite candidates); padded rows are offered
    # neighbours that are dropped at the end, and the filler tiles that even out the devices' shares are
    # skipped.
    n = x.shape[0]
    blocks = -(-n // block)
    pad = blocks * block - n
    rows = jnp.pad(unit_rows(x), ((0, pad), (0, 0)))
    first, second = np.triu_indices(blocks)
    filler = -len(first) % mesh.size
    tiles = np.stack([np.pad(first, (0, filler)), np.pad(second, (0, filler)),
                      np.arange(len(first) + filler) < len(first)], axis=1).astype(np.int32)
    split = block % 2 == 0 and block >= 16  # diagonal tiles as three half tiles

    def device_tiles(rows: jax.Array, tiles: jax.Array) -> tuple[jax.Array, jax.Array]:
        def offer(best, start, offered):
            size = offered[0].shape[0]
            current = tuple(lax.dynamic_slice_in_dim(b, start, size) for b in best)
            merged = _merge_later(current, offered, k)
            return tuple(lax.dynamic_update_slice_in_dim(b, m, start, 0) for b, m in zip(best, merged, strict=True))

        def square(best, rows_at, columns_at, size: int, diagonal: bool):
            """The offers of the tile of rows [rows_at, + size) and columns [columns_at, + size)."""
            inner = jnp.arange(size)
            sims = jnp.dot(lax.dynamic_slice_in_dim(rows, rows_at, size),
                           lax.dynamic_slice_in_dim(rows, columns_at, size).T, precision=lax.Precision.HIGHEST)
            if diagonal:
                sims = sims.at[inner, inner].set(-jnp.inf)
            if pad:
                sims = lax.cond(columns_at + size > n, lambda s: jnp.where(columns_at + inner < n, s, -jnp.inf),
                                lambda s: s, sims)
            best = offer(best, rows_at, _offer(sims, columns_at + inner, k, columns=False))
            if not diagonal:
                best = offer(best, columns_at, _offer(sims, rows_at + inner, k, columns=True))
            return best

        def diagonal_tile(best, at):
            if not split:
                return square(best, at, at, block, diagonal=True)
            half = block // 2  # its upper-left, upper-right and lower-right quarters, in this order
            best = square(best, at, at, half, diagonal=True)
            best = square(best, at, at + half, half, diagonal=False)
            return square(best, at + half, at + half, half, diagonal=True)

        def one_tile(best, tile):
            a, b = tile[0], tile[1]
            return lax.cond(a == b, lambda best: diagonal_tile(best, a * block),
                            lambda best: square(best, a * block, b * block, block, diagonal=False), best)

        def step(best, tile):
            return lax.cond(tile[2] == 1, one_tile, lambda best, _: best, best, tile), None

        empty = (jnp.full((rows.shape[0], k), -jnp.inf), jnp.zeros((rows.shape[0], k), jnp.int32))
        empty = lax.pcast(empty, (AXIS,), to="varying")  # each device's lists are its own
        best, _ = lax.scan(step if filler else lambda best, tile: (one_tile(best, tile), None), empty, tiles)
        return best[0][None], best[1][None]

    spec = PartitionSpec(AXIS)
    search = jax.shard_map(device_tiles, mesh=mesh, in_specs=(PartitionSpec(), spec), out_specs=(spec, spec))
    values, ids = search(rows, jnp.asarray(tiles))
    if mesh.size > 1:
        values, ids = (jnp.moveaxis(a, 0, 1).reshape(a.shape[1], -1) for a in (values, ids))
        values, ids = _best(values, ids, k)
        return values[:n], ids[:n]
    return values[0, :n], ids[0, :n]


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
