"""Alignment kernels against plain numpy references, their invariances, sharding, and bad input."""

import json

import chex
import jax
import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from configs.default import get_config
from lvaa_jax.alignment import (
    align_tables,
    clamp_outliers,
    knn,
    knn_indices,
    linear_cka,
    nearest_neighbours,
    precision_at_k,
    precision_interval,
    precision_matrix,
    precision_null,
    precision_sweep,
    procrustes_similarity,
    rsa,
    stage,
)
from lvaa_jax.alignment.stats import permutation_null
from lvaa_jax.embeddings.table import EmbeddingTable
from lvaa_jax.errors import LvaaError

N = 96


# ----------------------------------------------------------------------------------------------- references
def reference_knn(x: np.ndarray, k: int) -> np.ndarray:
    """Full float64 similarity matrix, rounded to 1e-6, self excluded, stable argsort (ties: lower index)."""
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = np.round(x @ x.T * 1e6)
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def reference_precision(a: np.ndarray, b: np.ndarray, k: int) -> float:
    na, nb = reference_knn(a, k), reference_knn(b, k)
    return float(np.mean([len(set(p) & set(q)) for p, q in zip(na, nb, strict=True)]) / k)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_cka(a: np.ndarray, b: np.ndarray, debiased: bool) -> float:
    """The Platonic Representation Hypothesis code's ``cka`` (kernel 'ip') on unit rows, in numpy: HSIC of
    the Gram matrices, biased (trace(K H L H)) or unbiased (Song et al.), without its +1e-6."""
    k, l_ = unit(a) @ unit(a).T, unit(b) @ unit(b).T
    hsic = hsic_unbiased if debiased else hsic_biased
    return float(hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_)))


def hsic_biased(k: np.ndarray, l_: np.ndarray) -> float:
    h = np.eye(len(k)) - 1 / len(k)
    return float(np.trace(k @ h @ l_ @ h))


def hsic_unbiased(k: np.ndarray, l_: np.ndarray) -> float:
    m = len(k)
    k, l_ = k.copy(), l_.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l_, 0)
    value = (k * l_.T).sum() + k.sum() * l_.sum() / ((m - 1) * (m - 2)) - 2 * (k @ l_).sum() / (m - 2)
    return float(value / (m * (m - 3)))


def reference_procrustes(a: np.ndarray, b: np.ndarray) -> float:
    """Unit rows, centre, reduce the wider to the narrower width by PCA (SVD), unit Frobenius norm, nuclear
    norm."""

    def pca(x, width):
        x = unit(x) - unit(x).mean(0)
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        return (u * s)[:, :width]

    width = min(a.shape[1], b.shape[1])
    a, b = pca(a, width), pca(b, width)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return float(np.linalg.svd(a.T @ b, compute_uv=False).sum())


# ----------------------------------------------------------------------------------------------- data
def gaussian(seed: int, n: int = N, d: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def with_duplicates(x: np.ndarray) -> np.ndarray:
    """Exact duplicates and an exact scaled copy (same direction): neighbours tie exactly."""
    x = x.copy()
    x[10] = x[3]
    x[40] = x[3]
    x[20] = 2 * x[5]
    x[N - 1] = x[0]
    return x


def sign_patterns(seed: int, n: int = N, d: int = 48, nonzero: int = 16) -> np.ndarray:
    """Rows of +-1 on 16 random coordinates: all norms are 4, every cosine is a multiple of 1/16 and computed
    exactly, so nearly every neighbour list ends in a tie broken by index (a bag-of-words-like space)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d), np.float32)
    for row in x:
        row[rng.choice(d, nonzero, replace=False)] = rng.choice([-1.0, 1.0], nonzero)
    x[7] = x[2]
    return x


def rotation(d: int, seed: int = 0, width: int | None = None) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((width or d, d)))
    return q.T.astype(np.float32)  # [d, width]: orthonormal rows


# ----------------------------------------------------------------------------------------------- kNN
@pytest.mark.parametrize("make", [lambda: with_duplicates(gaussian(0)), lambda: sign_patterns(1)],
                         ids=["gaussian_duplicates", "sign_patterns_ties"])
def test_knn_matches_numpy_reference(make):
    x = make()
    got = np.asarray(knn_indices(x, 9))
    chex.assert_shape(got, (N, 9))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, reference_knn(x, 9))


def test_duplicate_rows_get_identical_neighbours_except_each_other():
    x = with_duplicates(gaussian(0))
    nb = np.asarray(knn_indices(x, 5))
    assert nb[3, 0] == 10 and nb[10, 0] == 3  # the copies are each other's nearest (similarity 1)
    np.testing.assert_array_equal(np.setdiff1d(nb[3], [10, 40]), np.setdiff1d(nb[10], [3, 40]))


@pytest.mark.parametrize("block", [1, 7, 13, N])
def test_tile_sizes_and_sharding_equal_single_device(block):
    x = sign_patterns(2)
    single = np.asarray(knn_indices(x, 11, block_size=N, devices=jax.devices()[:1]))
    assert len(jax.devices()) == 8
    np.testing.assert_array_equal(np.asarray(knn_indices(x, 11, block_size=block)), single)
    np.testing.assert_array_equal(np.asarray(knn_indices(x, 11, block_size=block, devices=jax.devices()[:3])),
                                  single)


def few_directions(seed: int, n: int = N) -> np.ndarray:
    """Rows drawn from 6 sign patterns: every neighbour list is decided by ties, across tile groups."""
    return sign_patterns(seed, n=8)[np.random.default_rng(seed).integers(0, 6, n)]


@pytest.mark.parametrize("block, k", [(48, 9), (96, 9), (40, 9), (24, 5), (32, 3), (96, 40)])
@pytest.mark.parametrize("make", [sign_patterns, few_directions, lambda s: with_duplicates(gaussian(s))],
                         ids=["sign_patterns", "few_directions", "duplicates"])
def test_two_level_top_k_matches_reference(block, k, make):
    """Tiles wide enough for the group selection (k larger than a group, ties within and across groups, a
    padded last block when N is not a multiple of the tile), on one device and shared over 8."""
    assert knn.group_size(block, k) > 1
    x = make(4)
    want = reference_knn(x, k)
    for devices in (jax.devices()[:1], jax.devices()):
        np.testing.assert_array_equal(np.asarray(knn_indices(x, k, block_size=block, devices=devices)), want)


def test_neighbour_similarities_are_the_rounded_cosines():
    x = sign_patterns(5)
    values, ids = nearest_neighbours(x, 6)
    want = np.round(np.take_along_axis(unit(x) @ unit(x).T, np.asarray(ids), 1) * 1e6) / 1e6
    np.testing.assert_allclose(np.asarray(values), want, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(ids), reference_knn(x, 6))


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="accelerator tiles; run with JAX_PLATFORMS=cuda")
def test_default_tiles_on_an_accelerator_match_reference():
    """Accelerators take 8192-row tiles: 9000 rows make a ragged second block and a padded last tile."""
    x = sign_patterns(3, n=9000)
    np.testing.assert_array_equal(np.asarray(knn_indices(x, 15)), reference_knn(x, 15))


# ----------------------------------------------------------------------------------------------- precision
def test_precision_matches_reference_and_matrix():
    a, b, c = with_duplicates(gaussian(0)), sign_patterns(1), gaussian(3, d=40)
    assert precision_at_k(a, b, 9) == pytest.approx(reference_precision(a, b, 9), abs=1e-12)
    names, matrix = precision_matrix({"a": a, "b": b, "c": c}, 9)
    assert names == ("a", "b", "c")
    chex.assert_shape(matrix, (3, 3))
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    np.testing.assert_allclose(matrix, matrix.T)
    for (i, x), (j, y) in [((0, a), (1, b)), ((0, a), (2, c)), ((1, b), (2, c))]:
        assert matrix[i, j] == pytest.approx(reference_precision(x, y, 9), abs=1e-12)


def test_precision_invariances():
    a, b = gaussian(4), gaussian(5, d=20)
    assert precision_at_k(a, a, 7) == 1.0
    rotated = a @ rotation(a.shape[1], seed=1)
    assert precision_at_k(a, rotated, 7) == 1.0
    assert precision_at_k(a, b, 7) == precision_at_k(rotated * 3.0, b * 0.25, 7)


def test_k_sweep_matches_reference():
    a, b = with_duplicates(gaussian(0)), sign_patterns(1)
    sweep = precision_sweep(a, b, [1, 5, 20, 5])
    assert list(sweep) == [1, 5, 20]
    for k, value in sweep.items():
        assert value == pytest.approx(reference_precision(a, b, k), abs=1e-12)


# ----------------------------------------------------------------------------------------------- statistics
def test_permutation_null_is_near_chance_and_exact_relabelling():
    n, k = 200, 10
    a, b = gaussian(6, n=n), gaussian(7, n=n)
    key = jax.random.key(0)
    result = precision_null(a, b, k, key=key, permutations=200)
    assert result["null_mean"] == pytest.approx(k / (n - 1), abs=0.003)
    assert result["p_value"] > 0.01
    assert result["calibrated"] == pytest.approx(result["precision"] - result["null_mean"])
    assert precision_null(a, a @ rotation(12), k, key=key, permutations=50)["p_value"] == 1 / 51
    # Relabelling b's index sets is exactly the kNN of b with its instructions permuted (no ties here).
    indices = np.stack([reference_knn(a, k), reference_knn(b, k)]).astype(np.int32)
    null = permutation_null(jax.numpy.asarray(indices), np.asarray([[0, 1]], np.int32), key, 3)
    for i in range(3):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, i), n))
        assert null[i, 0] / (n * k) == pytest.approx(reference_precision(a, b[perm], k), abs=1e-12)


def test_bootstrap_interval_brackets_the_score():
    a, b = gaussian(8), gaussian(8) + 0.5 * gaussian(9)
    low, high = precision_interval(a, b, 5, key=jax.random.key(1), resamples=100)
    assert low < precision_at_k(a, b, 5) < high
    assert 0 < high - low < 0.3


# ----------------------------------------------------------------------------------------------- companions
def test_cka_procrustes_rsa_against_references_and_rotation():
    a, b = gaussian(10, d=12), gaussian(11, d=30) + np.pad(gaussian(10, d=12), ((0, 0), (0, 18)))
    for debiased in (False, True):
        assert linear_cka(a, b, debiased=debiased) == pytest.approx(reference_cka(a, b, debiased), abs=1e-4)
    assert procrustes_similarity(a, b) == pytest.approx(reference_procrustes(a, b), abs=1e-4)
    assert procrustes_similarity(b, a) == pytest.approx(reference_procrustes(a, b), abs=1e-4)
    expected = spearmanr(pdist(a.astype(np.float64), "cosine"), pdist(b.astype(np.float64), "cosine"))[0]
    assert rsa(a, b) == pytest.approx(expected, abs=1e-6)
    wide = 2.5 * a @ rotation(12, seed=3, width=20)  # a rotated into 20 dimensions, and scaled
    assert procrustes_similarity(a, wide) == pytest.approx(1.0, abs=1e-4)
    for debiased in (False, True):
        assert linear_cka(a, wide, debiased=debiased) == pytest.approx(1.0, abs=1e-4)
    assert rsa(a, wide) == pytest.approx(1.0, abs=1e-6)


def test_rsa_ties_share_ranks():
    x = sign_patterns(12, n=40)
    x64 = x.astype(np.float64)
    expected = spearmanr(pdist(x64, "cosine"), pdist(x64[:, ::-1], "cosine"))[0]
    assert rsa(x, x[:, ::-1]) == pytest.approx(expected, abs=1e-9)


def test_clamp_outliers_is_the_platonic_rule():
    x = gaussian(13)
    x[:, 0] *= 100
    t = np.quantile(np.abs(x), 0.95, axis=1).mean()
    np.testing.assert_allclose(np.asarray(clamp_outliers(x)), np.clip(x, -t, t), rtol=1e-6)


# ----------------------------------------------------------------------------------------------- bad input
def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("bad, fragment", [
    (lambda x: x[0], "2-D"),
    (lambda x: np.where(np.arange(N)[:, None] == 5, np.nan, x), "NaN or inf"),
    (lambda x: np.where(np.arange(N)[:, None] == 5, np.inf, x), "NaN or inf"),
    (lambda x: np.where(np.arange(N)[:, None] == 5, 0.0, x), "zero-norm row(s), the first is row 5"),
])
def test_bad_embeddings(bad, fragment):
    with pytest.raises(LvaaError) as e:
        knn_indices(bad(gaussian(0)), 5, name="minilm")
    assert fragment in _one_line(e) and "minilm" in str(e.value)


@pytest.mark.parametrize("k", [0, -1, N, N + 5, 2.5])
def test_bad_k(k):
    with pytest.raises(LvaaError) as e:
        precision_at_k(gaussian(0), gaussian(1), k)
    assert "between 1 and N-1" in _one_line(e)


def test_different_n():
    with pytest.raises(LvaaError) as e:
        precision_at_k(gaussian(0), gaussian(1, n=N - 1), 5)
    assert "95 instructions, but a has 96" in _one_line(e)


def _tables(n: int = 48) -> dict[str, EmbeddingTable]:
    """An agent with 2 layers and an LM with 3 whose layer 1 is the agent's last layer, rotated; a control."""
    instructions = tuple(f"instruction {i}" for i in range(n))
    agent = np.stack([gaussian(20, n=n, d=8), gaussian(21, n=n, d=8)])
    planted = np.pad(agent[1], ((0, 0), (0, 8))) @ rotation(16, 4)
    lm = np.stack([gaussian(22, n=n, d=16), planted, gaussian(23, n=n, d=16)])
    return {"agent": EmbeddingTable(agent, instructions, {}), "lm": EmbeddingTable(lm, instructions, {}),
            "random": EmbeddingTable(gaussian(24, n=n, d=5), instructions, {})}


@pytest.mark.parametrize("change, fragment", [
    (lambda ins: ins[::-1], "lm: same instructions as agent in a different order (row 0"),
    (lambda ins: ins[:-1] + ("something else",), "lm: instruction list differs from agent's"),
    (lambda ins: ins[:-1], "lm: 47 instructions, but agent has 48"),
])
def test_align_tables_rejects_mismatched_instructions(tmp_path, change, fragment):
    tables = _tables()
    lm = tables["lm"]
    instructions = change(lm.instructions)
    tables["lm"] = EmbeddingTable(lm.embeddings[:, : len(instructions)], instructions, {})
    with pytest.raises(LvaaError) as e:
        align_tables(tables, get_config("tiny").align, tmp_path)
    assert fragment in _one_line(e)


# ----------------------------------------------------------------------------------------------- the stage
def test_align_tables_end_to_end(tmp_path, monkeypatch):
    searches = []

    def counted(x, k, **kwargs):
        searches.append(kwargs["name"])
        return nearest_neighbours(x, k, **kwargs)

    monkeypatch.setattr(stage, "nearest_neighbours", counted)
    config = get_config("tiny").align
    config.k_sweep = (1, 5, 47, 60)  # 60 >= N: skipped and reported
    summary = align_tables(_tables(), config, tmp_path, {"Agent success": "level | 0.9", "Run": "seed 0"})
    assert len(searches) == 2 + 3 + 1  # once per (space, layer), whatever the number of pairs
    n, k = 48, config.k
    assert summary["n"] == n and summary["chance"] == pytest.approx(k / (n - 1))
    pairs = {(p["a"], p["b"]): p for p in summary["pairs"]}
    assert set(pairs) == {("agent", "lm"), ("agent", "random"), ("lm", "random")}
    planted = pairs["agent", "lm"]
    assert planted["best"]["layers"] == [1, 1] and planted["best"]["precision"] == 1.0
    assert planted["best"]["p_value"] == 1 / (1 + config.permutations)
    assert planted["last"]["layers"] == [1, 2] and planted["last"]["precision"] < 0.5
    for pair in summary["pairs"]:
        for which in ("last", "best"):
            v = pair[which]
            assert v["ci_low"] <= v["precision"] <= v["ci_high"]
            assert v["calibrated"] == pytest.approx(v["precision"] - v["null_mean"])

    for metric in ("precision_at_k", "precision_at_k_best_layers", "precision_calibrated", "precision_p_value",
                   "procrustes", "cka", "cka_debiased", "rsa"):
        payload = json.loads((tmp_path / f"{metric}.json").read_text())
        assert payload["names"] == ["agent", "lm", "random"]
        chex.assert_shape(np.asarray(payload["matrix"]), (3, 3))
        lines = (tmp_path / f"{metric}.csv").read_text().splitlines()
        assert lines[0] == "space,agent,lm,random" and len(lines) == 4
    best = json.loads((tmp_path / "precision_at_k_best_layers.json").read_text())
    assert best["layers"][0][1] == [1, 1] and best["layers"][1][0] == [1, 1]
    assert (tmp_path / "precision_at_k.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "layers_lm.png").exists() and not (tmp_path / "layers_random.png").exists()
    sweep = json.loads((tmp_path / "k_sweep.json").read_text())
    assert sweep["skipped_k"] == [60] and {r["k"] for r in sweep["records"]} == {1, 5, 47}
    assert all(r["n"] == n for r in sweep["records"])
    assert [r["precision"] for r in sweep["records"] if r["k"] == 47] == pytest.approx([1.0] * 3)
    layers = json.loads((tmp_path / "layers.json").read_text())["records"]
    assert len(layers) == 2 * 3 + 2 * 1 + 3 * 1
    report = (tmp_path / "report.md").read_text()
    assert report.index("## Headline") < report.index("## Agent success") < report.index("## Run")
    assert "| agent | lm | 1/2 |" in report and "k = 60" in report
    assert json.loads((tmp_path / "summary.json").read_text())["pairs"] == summary["pairs"]
