"""The Platonic Representation Hypothesis metric family against direct transcriptions of that code's
definitions (github.com/minyoungg/platonic-rep, ``metrics.py``), and every metric on degenerate input."""

import json

import chex
import jax
import numpy as np
import pytest

from configs.default import get_config
from lvaa_jax.alignment import (
    align_tables,
    cknna,
    cycle_knn,
    edit_distance_knn,
    knn_indices,
    lcs_knn,
    linear_cka,
    precision_at_k,
    precision_interval,
    precision_null,
    precision_sweep,
    procrustes_similarity,
    rsa,
    svcca,
)
from lvaa_jax.alignment.knn_family import edit_distances, lcs_lengths
from lvaa_jax.embeddings.table import EmbeddingTable
from lvaa_jax.errors import LvaaError
from tests.test_alignment import gaussian, hsic_unbiased, reference_knn, sign_patterns, unit, with_duplicates

K = 7
DATA = {  # name: (a, b), both over the same N = 96 instructions
    "gaussian": (gaussian(30, d=12), gaussian(31, d=20) + np.pad(gaussian(30, d=12), ((0, 0), (0, 8)))),
    "ties": (sign_patterns(32), with_duplicates(sign_patterns(33, d=24, nonzero=8))),
}


# ----------------------------------------------------------------------------------------------- transcriptions
# That code's definitions in numpy, on unit rows (its pipeline normalises them), with neighbour lists from
# ``reference_knn`` (our tie rule, where that code uses argsort/topk on unrounded similarities).
def their_cycle_knn(a, b, k):
    knn_a, knn_b = reference_knn(a, k), reference_knn(b, k)
    n = len(knn_a)
    hits = knn_a[knn_b] == np.arange(n).reshape(-1, 1, 1)  # compute_knn_accuracy
    return float(hits.reshape(n, -1).max(1).mean())


def their_lcs_length(x, y):
    m, n = len(x), len(y)
    dp = [[0] * (n + 1) for _ in range(m + 1)]
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            dp[i][j] = dp[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(dp[i - 1][j], dp[i][j - 1])
    return dp[m][n]


def their_edit_distance(seq1, seq2):  # torchaudio.functional.edit_distance
    old = list(range(len(seq2) + 1))
    for i in range(1, len(seq1) + 1):
        new = [i] + [0] * len(seq2)
        for j in range(1, len(seq2) + 1):
            if seq1[i - 1] == seq2[j - 1]:
                new[j] = old[j - 1]
            else:
                new[j] = min(old[j - 1] + 1, new[j - 1] + 1, old[j] + 1)
        old = new
    return old[-1]


def their_lcs_knn(a, b, k):
    return float(np.mean([their_lcs_length(x, y) for x, y in zip(reference_knn(a, k), reference_knn(b, k),
                                                                   strict=True)]))


def their_edit_distance_knn(a, b, k):
    distances = [their_edit_distance(x, y) for x, y in zip(reference_knn(a, k), reference_knn(b, k), strict=True)]
    return 1 - float(np.mean(distances)) / k


def their_cknna(a, b, k):
    """``cknna`` with its defaults (unbiased, not distance agnostic), masks from our neighbour lists, and
    without the +1e-6 in its denominator."""
    kernel_a, kernel_b = unit(a) @ unit(a).T, unit(b) @ unit(b).T
    n = len(kernel_a)

    def mask(x):
        out = np.zeros((n, n))
        np.put_along_axis(out, reference_knn(x, k), 1.0, axis=1)
        return out

    mask_a, mask_b = mask(a), mask(b)

    def similarity(kk, ll, m):
        return hsic_unbiased(m * kk, m * ll)

    cross = similarity(kernel_a, kernel_b, mask_a * mask_b)
    return cross / np.sqrt(similarity(kernel_a, kernel_a, mask_a) * similarity(kernel_b, kernel_b, mask_b))


def their_svcca(a, b, cca_dim=10):
    """``svcca`` verbatim in its steps: torch.svd_lowrank (seeded) and sklearn's CCA."""
    torch = pytest.importorskip("torch")
    cross_decomposition = pytest.importorskip("sklearn.cross_decomposition")

    def preprocess(x):
        x = torch.from_numpy(unit(x))
        x = x - torch.mean(x, axis=0)
        return x / (torch.std(x, axis=0) + 1e-8)

    torch.manual_seed(0)
    u1, _, _ = torch.svd_lowrank(preprocess(a), q=cca_dim)
    u2, _, _ = torch.svd_lowrank(preprocess(b), q=cca_dim)
    cca = cross_decomposition.CCA(n_components=cca_dim, max_iter=2000, tol=1e-10)
    c1, c2 = cca.fit(u1.numpy(), u2.numpy()).transform(u1.numpy(), u2.numpy())
    return float(np.mean([np.corrcoef(c1[:, i], c2[:, i])[0, 1] for i in range(cca_dim)]))


# ----------------------------------------------------------------------------------------------- the family
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("ours, theirs", [(cycle_knn, their_cycle_knn), (lcs_knn, their_lcs_knn),
                                          (edit_distance_knn, their_edit_distance_knn)],
                         ids=["cycle", "lcs", "edit_distance"])
def test_knn_metrics_match_their_definitions(data, ours, theirs):
    a, b = DATA[data]
    for x, y in ((a, b), (b, a), (a, a)):
        assert ours(x, y, K) == pytest.approx(theirs(x, y, K), abs=1e-12)


@pytest.mark.parametrize("data", DATA)
def test_cknna_matches_its_definition(data):
    a, b = DATA[data]
    for x, y in ((a, b), (b, a)):
        assert cknna(x, y, K) == pytest.approx(their_cknna(x, y, K), abs=2e-5)  # ours reads 1e-6-rounded sims
    assert cknna(a, a, K) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct_rows", "duplicate_rows"])
def test_svcca_matches_its_definition_and_is_rotation_invariant(ties):
    rng = np.random.default_rng(34)
    signal = rng.standard_normal((200, 10)) * np.linspace(3, 1, 10)  # a clear top-10 subspace per space
    a = (signal @ rng.standard_normal((10, 24)) + 0.05 * rng.standard_normal((200, 24))).astype(np.float32)
    b = (np.tanh(signal[:, ::-1]) @ rng.standard_normal((10, 40))
         + 0.05 * rng.standard_normal((200, 40))).astype(np.float32)
    if ties:  # duplicated rows and a scaled copy: equal unit rows, as in bag-of-words spaces
        a, b = with_duplicates(a), with_duplicates(b)
    assert svcca(a, b) == pytest.approx(their_svcca(a, b), abs=2e-3)
    assert svcca(a, a @ np.linalg.qr(rng.standard_normal((24, 24)))[0].astype(np.float32)) < 1.0 + 1e-6
    assert svcca(a, a) == pytest.approx(1.0, abs=1e-4)


def test_dynamic_programmes_on_hand_made_lists():
    ia = np.asarray([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4], [9, 8, 7, 6]], np.int32)
    ib = np.asarray([[1, 2, 3, 4], [8, 7, 6, 5], [4, 3, 9, 1], [1, 2, 3, 4]], np.int32)
    np.testing.assert_array_equal(np.asarray(lcs_lengths(ia, ib)), [4, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(edit_distances(ia, ib)), [0, 4, 4, 4])
    for x, y in zip(ia, ib, strict=True):
        assert their_edit_distance(x, y) == int(edit_distances(x[None], y[None])[0])


def test_family_in_align_tables(tmp_path):
    n = 48
    instructions = tuple(f"instruction {i}" for i in range(n))
    a, b, c = gaussian(40, n=n, d=16), gaussian(41, n=n, d=16), gaussian(42, n=n, d=5)
    tables = {"a": EmbeddingTable(a, instructions, {}), "b": EmbeddingTable(b, instructions, {}),
              "c": EmbeddingTable(c, instructions, {})}
    config = get_config("tiny").align
    summary = align_tables(tables, config, tmp_path)
    k = config.k
    for metric, fn in (("cycle_knn", their_cycle_knn), ("lcs_knn", their_lcs_knn),
                       ("edit_distance_knn", their_edit_distance_knn), ("cknna", their_cknna)):
        matrix = np.asarray(json.loads((tmp_path / f"{metric}.json").read_text())["matrix"], float)
        chex.assert_shape(matrix, (3, 3))
        assert matrix[0, 1] == pytest.approx(fn(a, b, k), abs=2e-5)
        assert matrix[2, 0] == pytest.approx(fn(c, a, k), abs=2e-5)  # row: first argument
        for suffix in ("_calibrated", "_p_value", "_null_mean"):
            assert (tmp_path / f"{metric}{suffix}.csv").exists()
        p = np.asarray(json.loads((tmp_path / f"{metric}_p_value.json").read_text())["matrix"], float)
        assert ((p >= 1 / (1 + config.permutations)) & (p <= 1)).all()
    svcca_matrix = json.loads((tmp_path / "svcca.json").read_text())["matrix"]
    assert svcca_matrix[0][1] == pytest.approx(svcca(a, b), abs=1e-5)
    assert svcca_matrix[2] == [None, None, None]  # c is 5 wide: below SVCCA's 10 directions
    assert (tmp_path / "svcca.csv").read_text().splitlines()[3] == "c,n/a,n/a,n/a"
    assert {"metric": "svcca", "space": "c",
            "reason": "its width 5 is below the 10 directions SVCCA keeps"} in summary["undefined"]
    report = (tmp_path / "report.md").read_text()
    assert "## The Platonic Representation Hypothesis metric family" in report
    assert "- svcca, c: its width 5 is below the 10 directions SVCCA keeps." in report
    assert all(0 <= space["ties_at_k"] <= 1 for space in summary["spaces"])


# ----------------------------------------------------------------------------------------------- degenerate input
def _one_line_error(call) -> str:
    with pytest.raises(LvaaError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


PAIR_METRICS = {  # name: metric(a, b) at the largest usable k
    "precision_at_k": lambda a, b: precision_at_k(a, b, min(K, len(a) - 1)),
    "cycle_knn": lambda a, b: cycle_knn(a, b, min(K, len(a) - 1)),
    "lcs_knn": lambda a, b: lcs_knn(a, b, min(K, len(a) - 1)),
    "edit_distance_knn": lambda a, b: edit_distance_knn(a, b, min(K, len(a) - 1)),
    "cknna": lambda a, b: cknna(a, b, min(K, len(a) - 1)),
    "cka": lambda a, b: linear_cka(a, b),
    "cka_debiased": lambda a, b: linear_cka(a, b, debiased=True),
    "procrustes": procrustes_similarity,
    "rsa": rsa,
    "svcca": svcca,
    "precision_null": lambda a, b: precision_null(a, b, 1, key=jax.random.key(0), permutations=9)["calibrated"],
    "precision_interval": lambda a, b: precision_interval(a, b, 1, key=jax.random.key(0), resamples=9)[0],
    "precision_sweep": lambda a, b: precision_sweep(a, b, [1])[1],
}
# At N = 2 every instruction is the other's only neighbour and two centred rows span one direction: scores are
# their trivial values, which equal chance (k/(N-1) = 1) for the kNN ones, and the permutation null says so.
AT_N2 = {"precision_at_k": 1.0, "cycle_knn": 1.0, "lcs_knn": 1.0, "edit_distance_knn": 1.0, "cka": 1.0,
         "procrustes": 1.0, "precision_null": 0.0, "precision_interval": 1.0, "precision_sweep": 1.0}
REFUSED = {  # metric: (smallest N, what the refusal says below it)
    "cknna": (4, "CKNNA needs at least 4 instructions"),
    "cka_debiased": (4, "the unbiased HSIC needs at least 4"),
    "rsa": (3, "needs at least 3"),
    "svcca": (11, "needs N > 10"),
}


@pytest.mark.parametrize("metric", PAIR_METRICS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_small_n_gives_a_defined_value_or_one_line(metric, n):
    a, b = gaussian(50, n=n, d=12), gaussian(51, n=n, d=12)
    smallest, fragment = REFUSED.get(metric, (2, ""))
    if n < smallest:
        assert fragment in _one_line_error(lambda: PAIR_METRICS[metric](a, b))
        return
    try:
        value = PAIR_METRICS[metric](a, b)
    except LvaaError as e:  # only where the estimator itself is undefined on this draw: said in one line
        assert metric in ("cknna", "cka_debiased") and "not above 0" in str(e) and "\n" not in str(e)
        return
    assert np.isfinite(value)
    if n == 2:
        assert value == pytest.approx(AT_N2[metric], abs=1e-6)


@pytest.mark.parametrize("metric", PAIR_METRICS)
def test_constant_space_is_refused(metric):
    a = gaussian(52, n=20, d=12)
    constant = np.tile(gaussian(53, n=1, d=12), (20, 1)) * np.linspace(1, 3, 20)[:, None]  # one direction
    message = _one_line_error(lambda: PAIR_METRICS[metric](a, constant))
    assert "b: all 20 rows point the same way" in message


def test_knn_of_a_constant_space_is_refused():
    assert "point the same way" in _one_line_error(lambda: knn_indices(np.ones((5, 3)), 2))


def test_undefined_debiased_cka_is_refused_not_nan():
    # Four points on a line, two each way: the unbiased HSIC of the space with itself is exactly 0, where the
    # estimator used to give a NaN or values beyond 1.
    line = np.asarray([[1.0], [-1.0], [2.0], [3.0]], np.float32)
    message = _one_line_error(lambda: linear_cka(line, gaussian(54, n=4, d=3), debiased=True))
    assert "cka_debiased is undefined for a: its unbiased HSIC with itself is" in message
    assert "not above 0" in message
    assert np.isfinite(linear_cka(line, gaussian(54, n=4, d=3)))


def _layered_tables(n: int, layer0: np.ndarray | None = None) -> dict[str, EmbeddingTable]:
    instructions = tuple(f"instruction {i}" for i in range(n))
    lm = np.stack([gaussian(60, n=n, d=16) if layer0 is None else layer0, gaussian(61, n=n, d=16)])
    return {"lm": EmbeddingTable(lm, instructions, {}),
            "agent": EmbeddingTable(gaussian(62, n=n, d=16), instructions, {})}


def test_constant_layer_is_left_out_and_reported(tmp_path):
    n = 30
    cls_state = np.tile(gaussian(63, n=1, d=16), (n, 1))  # a first-token state at the input layer
    summary = align_tables(_layered_tables(n, cls_state), get_config("tiny").align, tmp_path)
    assert summary["skipped_layers"] == [{"space": "lm", "layer": 0}]
    layers = json.loads((tmp_path / "layers.json").read_text())["records"]
    assert [(r["layer_a"], r["layer_b"]) for r in layers if {r["a"], r["b"]} == {"lm", "agent"}] == [(1, 0)]
    assert "left out of the layer search and the per-layer curves: lm layer 0." in (tmp_path / "report.md").read_text()


def test_constant_last_layer_and_tiny_n_are_refused(tmp_path):
    n = 30
    tables = _layered_tables(n)
    tables["agent"] = EmbeddingTable(np.ones((n, 4), np.float32), tables["agent"].instructions, {})
    assert "agent: all 30 rows point the same way" in _one_line_error(
        lambda: align_tables(tables, get_config("tiny").align, tmp_path))
    config = get_config("tiny").align
    config.k, config.k_sweep = 1, (1,)
    assert "needs at least 4" in _one_line_error(lambda: align_tables(_layered_tables(3), config, tmp_path))


def test_k_of_one_leaves_cknna_undefined_and_says_why(tmp_path):
    config = get_config("tiny").align
    config.k, config.k_sweep = 1, (1, 2)
    summary = align_tables(_layered_tables(12), config, tmp_path)
    reasons = {(e["metric"], e["space"]): e["reason"] for e in summary["undefined"]}
    assert reasons["cknna", "lm"] == "k = 1; CKNNA needs k >= 2"
    assert json.loads((tmp_path / "cknna.json").read_text())["matrix"] == [[None, None], [None, None]]
