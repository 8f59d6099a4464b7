"""k-nearest-neighbour index sets by cosine similarity, and precision@k (mutual kNN overlap) from them.

Neighbours are the one expensive step (an N x N similarity per space), so they are computed once per space
(per layer) and every score is then a cheap comparison of index sets: all M x M pairs, every layer pair, the
permutation null, the bootstrap and the k sweep read the same ``[N, K]`` arrays.

Ties. Identical instruction vectors are common here (bag-of-words spaces, input-embedding layers), and
float summation order would then decide their order. Similarities are therefore rounded to multiples of
1e-6 before the selection (float32 noise is ~1e-7, so copies tie again), and equal values go to the lower
index (the selection's integer keys encode that order, and lists merge in it): identical rows
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
from lvaa_jax.distributed import cooperating, gathered, replicated_on
from lvaa_jax.errors import LvaaError

QUANTA_PER_UNIT = 1_000_000  # similarities are rounded to multiples of 1e-6
AXIS = "data"


def default_block_size(n: int, num_devices: int, platform: str) -> int:
    """Side of the square similarity tiles: ``block`` x ``block`` float32 per step.

    Larger tiles waste more matmul on the diagonal tiles (about block / 4N of it) and, on CPU, no longer
    fit the cache that the selection's passes over a tile read from. Measured on this project's 2-core
    machine (one core, N = 10 000 and 20 000): at D = 384, tiles of 1 000 rows took 0.55-0.60 CPU s
    against 0.67 for 2 000 rows and 0.87 for 5 000 at N = 10 000, and 640-2 000 rows were within 3% at
    N = 20 000; at D = 4 096, 512-2 000 rows were within 4%. So about 1 024 rows whatever D and N.
    Accelerators want large tiles for their matmul units. With several devices there are at least 2
    blocks per device, so the tiles, which devices share out, number at least ~2 per device. A multiple
    of 8, splitting N into equal blocks.
    """
    block = 1024 if platform == "cpu" else 8192
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
    ``devices`` (default: all, those of every process in a job of several, each of which then gets the
    whole result as an array of its own). ``name`` labels the space in error messages.
    """
    return nearest_neighbours(x, k, block_size=block_size, devices=devices, name=name)[1]


def nearest_neighbours(x, k: int, *, block_size: int | None = None, devices: Sequence[jax.Device] | None = None,
                       name: str = "embeddings") -> tuple[jax.Array, jax.Array]:
    """(float32[N, k] similarities, int32[N, k] indices): ``knn_indices`` with the cosine similarity of each
    listed neighbour, rounded to 1e-6 as the search ranks them (what CKNNA reads)."""
    x = check_space(x, name)
    n = x.shape[0]
    k = check_k(k, n)
    if devices is None:  # in a block process 0 runs alone (the training curve), its own devices
        devices = jax.devices() if cooperating() else jax.local_devices()
    devices = tuple(devices)
    if block_size is None:
        block_size = default_block_size(n, len(devices), devices[0].platform)
    elif isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise LvaaError(f"block_size={block_size!r}: must be a positive integer")
    mesh = data_mesh(devices)
    # Over a mesh of several processes, x enters as one replicated array and the lists come back whole.
    values, ids = gathered(_knn(replicated_on(x, mesh), k=k, block=int(block_size), mesh=mesh), mesh)
    return values / QUANTA_PER_UNIT, ids


def _best(values: jax.Array, ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k best (quantised similarity, column id) of each row of [R, C] candidates in any order: higher
    similarity first, then the lower id."""
    negated, ids = lax.sort((-values, ids), dimension=1, num_keys=2)
    return -negated[:, :k], ids[:, :k]


PLACE_BITS = 10  # a selection key's low bits: a candidate's place among at most PLACES
PLACES = 1 << PLACE_BITS
OFFSET = 1 << 20  # quantised similarities (|q| <= 1e6 + float noise) + OFFSET lie in (0, 2^21): a key fits int32


def _keys(quantised: jax.Array, places: jax.Array) -> jax.Array:
    """int32 keys in the search's order: the larger quantised similarity (high bits), then the lower place
    (the complement of the place, low bits). Distinct places give distinct keys, -inf ones included (high
    bits 0, below every similarity), so one integer maximum yields a value and its place at once."""
    finite = quantised > -jnp.inf
    high = jnp.where(finite, jnp.where(finite, quantised, 0).astype(jnp.int32) + OFFSET, 0)
    return (high << PLACE_BITS) | (PLACES - 1 - places)


def _values_places(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(quantised similarity, place) of each key (``_keys`` inverted)."""
    high = keys >> PLACE_BITS
    return jnp.where(high == 0, -jnp.inf, (high - OFFSET).astype(jnp.float32)), PLACES - 1 - (keys & (PLACES - 1))


def _largest(keys: jax.Array, k: int) -> jax.Array:
    """[k, R]: the k largest of the distinct keys [C, R] along axis 0, largest first. Each step is one fused
    maximum over the largest keys below the previous step's, vectorised along R, with nothing written back:
    k passes over C keys cost less on CPU than ``lax.top_k``, which runs a partial sort per row on one
    thread (~1 us per row plus ~3 ns per entry, measured)."""
    def step(previous, _):
        key = jnp.where(keys < previous, keys, -1).max(0)
        return key, key

    largest = keys.max(0)
    return jnp.concatenate([largest[None], lax.scan(step, largest, None, length=k - 1)[1]])


def group_size(block: int, k: int) -> int:
    """Entries per group of the two-level selection over ``block`` entries (1: a plain top-k).

    The selection ranks block / g group maxima and then the k g entries of the k best groups, so
    g ~ sqrt(block / k) balances the two; g divides the block.
    """
    target = max(1, round((block / k) ** 0.5))
    g = next(g for g in range(target, 0, -1) if block % g == 0)
    return g if g > 1 and k * g < block and block // g <= PLACES and k * (g + 1) <= PLACES else 1


def _offer(sims: jax.Array, other: jax.Array, current: tuple[jax.Array, jax.Array], k: int,
           columns: bool) -> tuple[jax.Array, jax.Array]:
    """The lists ``current`` ([B, k] quantised similarities and ids, best first) of the rows of a [B, B]
    tile of similarities (-inf where masked), or of its columns when ``columns``, merged with the tile's
    entries; ``other`` holds the ids along the other axis, all above every id in ``current`` (which
    therefore wins ties). Best first, ties to the lower id.

    Two-level where the tile allows it (``group_size``), and exact: the k groups of g consecutive entries
    with the highest maxima (ties to the lower group) hold the tile's top k, since each of the k groups
    ranked above any other group holds an entry that beats all of that group's entries; the top k of
    ``current`` and the tile is among ``current`` and those k g entries. Both levels select with
    ``_largest`` on keys laid out [candidates, B], so every pass is vectorised along B; the group maxima
    (one pass over the tile) are the only work per entry, and columns are read where they lie. Rounding
    commutes with the maximum, so only maxima and candidates are rounded.
    """
    b = sims.shape[0]
    g = group_size(b, k)
    current_values, current_ids = current
    if g == 1:  # a small tile or a large k: one top-k over the current list and the whole tile
        values, at = lax.top_k(jnp.concatenate(
            [current_values, jnp.round((sims.T if columns else sims) * QUANTA_PER_UNIT)], 1), k)
        held = jnp.take_along_axis(current_ids, jnp.minimum(at, k - 1), axis=1)
        return values, jnp.where(at < k, held, other[jnp.maximum(at - k, 0)])
    groups = b // g
    if columns:
        maxima = sims.reshape(groups, g, b).max(1)  # [groups, B]
    else:
        maxima = sims.reshape(b, groups, g).max(2).T
    chosen = _values_places(_largest(_keys(jnp.round(maxima * QUANTA_PER_UNIT), jnp.arange(groups)[:, None]), k))[1]
    # the chosen groups in increasing order (so that candidates' places follow their ids), by their ranks
    rank = (chosen[None, :, :] < chosen[:, None, :]).sum(1)  # [k, B]
    chosen = jnp.where(rank[None] == jnp.arange(k)[:, None, None], chosen[None], 0).sum(1)
    if columns:
        picked = jnp.take_along_axis(sims.reshape(groups, g, b), chosen[:, None, :], axis=0).reshape(k * g, b)
    else:
        picked = jnp.take_along_axis(sims.reshape(b, groups, g), chosen.T[:, :, None], axis=1).reshape(b, k * g).T
    candidates = jnp.concatenate([current_values.T, jnp.round(picked * QUANTA_PER_UNIT)])  # current first
    values, places = _values_places(_largest(_keys(candidates, jnp.arange(k + k * g)[:, None]), k))
    in_tile = jnp.maximum(places - k, 0)
    tile_ids = other[jnp.take_along_axis(chosen, in_tile // g, axis=0) * g + in_tile % g]
    held = jnp.take_along_axis(current_ids.T, jnp.minimum(places, k - 1), axis=0)
    return values.T, jnp.where(places < k, held, tile_ids).T


@functools.partial(jax.jit, static_argnames=("k", "block", "mesh"))
def _knn(x: jax.Array, *, k: int, block: int, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    # The similarity matrix is symmetric, so only its tiles (a, b) with a <= b are computed: each tile offers
    # its rows' neighbours to block a and its columns' neighbours to block b: half the matmul FLOPs of a
    # row-by-row search. Devices take equal shares of the tiles, keep a running top-k of every row, and
    # their lists are merged at the end. Tiles run in row-major order, so each block is offered candidates
    # in increasing column order (blocks c < b from tiles (c, b), then b, b + 1, ... from tiles (b, .)) and
    # a device merges lists in the selection itself (``_offer``). A diagonal tile is symmetric too, so it is computed
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
        def offer(best, sims, start, other, columns: bool):
            current = tuple(lax.dynamic_slice_in_dim(b, start, sims.shape[0]) for b in best)
            merged = _offer(sims, other, current, k, columns)
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
            best = offer(best, sims, rows_at, columns_at + inner, columns=False)
            if not diagonal:
                best = offer(best, sims, columns_at, rows_at + inner, columns=True)
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
