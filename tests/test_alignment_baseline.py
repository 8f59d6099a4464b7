"""The language-model baseline, each space's mean pairwise cosine (anisotropy) and align.center, on small
synthetic spaces whose answers are known in closed form."""

import csv
import json

import chex
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.default import get_config
from lvaa_jax.alignment import align_tables
from lvaa_jax.alignment.baseline import language_model_baseline, space_kind
from lvaa_jax.alignment.knn import upper_pairs
from lvaa_jax.alignment.spaces import _unit_sum, centre, mean_cosine
from lvaa_jax.alignment.stage import Settings
from lvaa_jax.embeddings.table import EmbeddingTable
from lvaa_jax.errors import LvaaError


def shared_direction(n: int, a: float, b: float) -> np.ndarray:
    """Row i = a e_0 + b e_{i+1}: every two rows have cosine a^2 / (a^2 + b^2)."""
    x = np.zeros((n, n + 1), np.float32)
    x[:, 0] = a
    x[np.arange(n), np.arange(n) + 1] = b
    return x


def brute_mean_cosine(x: np.ndarray) -> float:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u.astype(np.float64) @ u.T.astype(np.float64)
    n = len(x)
    return float((s.sum() - np.trace(s)) / (n * (n - 1)))


# ------------------------------------------------------------------------------- anisotropy and centring
@pytest.mark.parametrize(("a", "b"), [(3.0, 1.0), (1.0, 1.0), (0.0, 2.0)])
def test_mean_cosine_of_a_shared_direction_is_known(a, b):
    x = shared_direction(20, a, b)
    chex.assert_shape(_unit_sum(jnp.asarray(x)), (21,))
    assert mean_cosine(x) == pytest.approx(a * a / (a * a + b * b), abs=1e-6)


def test_mean_cosine_matches_the_full_matrix():
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32) + 0.7
    assert mean_cosine(x) == pytest.approx(brute_mean_cosine(x), abs=1e-6)
    assert mean_cosine(np.random.default_rng(1).standard_normal((2000, 64))) == pytest.approx(0, abs=0.01)


def test_centring_removes_the_shared_direction():
    """Centred, the rows of equal norm sum to zero: mean cosine -1/(N-1), whatever the shared part was."""
    n = 20
    x = centre(jnp.asarray(shared_direction(n, 5.0, 1.0)))
    chex.assert_shape(x, (n, n + 1))
    np.testing.assert_allclose(np.asarray(x).mean(0), 0, atol=1e-6)
    assert mean_cosine(x) == pytest.approx(-1 / (n - 1), abs=1e-6)


def translated_tables(n: int = 40) -> dict[str, EmbeddingTable]:
    """One space, and the same space moved far along one direction: translation changes cosines (and
    neighbours), not the centred space."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    instructions = tuple(f"go to the box number {i}" for i in range(n))
    offset = np.zeros(8, np.float32)
    offset[0] = 6.0
    return {"a": EmbeddingTable(x, instructions, {"kind": "decoder"}),
            "b": EmbeddingTable(x + offset, instructions, {"kind": "decoder"})}


@pytest.mark.parametrize("center", [False, True])
def test_align_center_is_applied_and_recorded(tmp_path, center):
    config = get_config("tiny").align
    config.center = center
    summary = align_tables(translated_tables(), config, tmp_path)
    precision = summary["pairs"][0]["last"]["precision"]
    assert precision == 1.0 if center else precision < 0.8
    assert summary["settings"]["center"] is center
    assert json.loads((tmp_path / "precision_at_k.json").read_text())["center"] is center
    assert json.loads((tmp_path / "headline.json").read_text())["center"] is center
    assert f"align.center): {'on' if center else 'off'}" in (tmp_path / "report.md").read_text()
    # The mean cosine is the stored space's, centred or not.
    spaces = {s["name"]: s for s in summary["spaces"]}
    assert spaces["b"]["mean_cosine"] == pytest.approx(brute_mean_cosine(translated_tables()["b"].embeddings),
                                                       abs=1e-6)


@pytest.mark.parametrize(("key", "value", "bound"), [
    ("center", "yes", "True or False"), ("center", 1, "True or False"), ("clamp_outliers", None, "True or False"),
    ("permutations", 0, "a positive integer"), ("bootstrap", -1, "a positive integer"),
    ("block_size", -8, "an integer >= 0"), ("rsa_max_n", 0, "a positive integer"), ("seed", -1, "an integer >= 0"),
    ("k_sweep", (5, 0), "a positive integer"),
])
def test_align_settings_are_checked(key, value, bound):
    config = ml_collections.ConfigDict({**get_config().align.to_dict(), key: value})  # as a config file sets it
    shown = 0 if key == "k_sweep" else value
    with pytest.raises(LvaaError, match=f"^config.align.{key}={shown!r}: must be {bound}$"):
        Settings.from_config(config, 100)


def test_the_shipped_align_settings_pass():
    settings = Settings.from_config(get_config().align, 558)
    assert settings.center is False and settings.block_size is None and settings.sweep[-1] == 50


# ------------------------------------------------------------------------------------------- kinds
@pytest.mark.parametrize(("meta", "kind"), [
    ({"kind": "decoder", "source": "x"}, "decoder"),
    ({"kind": "action", "checkpoint_step": 3000}, "action"),
    ({"kind": "control", "checkpoint_step": 0}, "control"),
    ({"control": "bag_of_words", "dim": 28}, "control"),  # tables written before the kind field
    ({"model": "lvaa_jax agent", "checkpoint_step": 3000}, "action"),
    ({"model": "lvaa_jax agent", "checkpoint_step": 0}, "control"),
    ({}, "unknown"),
])
def test_space_kind_reads_the_metadata(meta, kind):
    assert space_kind(meta) == kind


# ---------------------------------------------------------------------------------------- the baseline
NAMES = ("agent", "d1", "d2", "d3", "e1", "e2", "words")
KINDS = ("action", "decoder", "decoder", "blip", "encoder", "clip", "control")


def planted_scores(precision: dict[tuple[str, str], float], null: float = 0.05, draws: int = 30,
                   paired: bool = True) -> tuple:
    """Headline arrays over ``upper_pairs`` with the given precisions (others 0.1), a constant null mean and
    bootstrap draws around each precision: the same shift for every pair in a draw (``paired``), spread
    symmetrically, or independent shifts per pair."""
    pairs = upper_pairs(len(NAMES))
    values = np.asarray([precision.get((NAMES[a], NAMES[b]), 0.1) for a, b in pairs])
    spread = (np.linspace(-0.01, 0.01, draws)[:, None] if paired
              else np.random.default_rng(0).normal(0, 0.01, (draws, len(pairs))))
    boot = values + spread
    scores = {"precision": values, "null_mean": np.full(len(pairs), null), "calibrated": values - null,
              "ci_low": values - 0.01, "ci_high": values + 0.01, "p_value": np.full(len(pairs), 0.01)}
    return pairs, scores, boot


def test_baseline_compares_action_with_each_family():
    precision = {("agent", "d1"): 0.55, ("agent", "d2"): 0.65, ("d1", "d2"): 0.85,
                 ("agent", "e1"): 0.30, ("agent", "e2"): 0.40, ("e1", "e2"): 0.30,
                 ("agent", "d3"): 0.70}
    pairs, scores, boot = planted_scores(precision)
    result = language_model_baseline(NAMES, KINDS, pairs, {"last": scores}, {"last": boot}, 0.95)
    rows = {(r["family"], r["model"]): r for r in result["records"]}
    assert set(rows) == {("decoder", "d1"), ("decoder", "d2"), ("decoder", "mean"), ("encoder", "e1"),
                         ("encoder", "mean"), ("vision-language", "d3"), ("vision-language", "e2"),
                         ("vision-language", "mean")}
    decoders = rows["decoder", "mean"]
    assert decoders["action_precision"] == pytest.approx(0.60)
    assert decoders["peer_precision"] == pytest.approx(0.85)
    assert decoders["ratio_calibrated"] == pytest.approx(0.55 / 0.80)
    assert decoders["difference"] == pytest.approx(-0.25)
    assert decoders["difference_ci_low"] == pytest.approx(-0.25) == decoders["difference_ci_high"]
    assert decoders["ratio_ci_low"] <= 0.55 / 0.80 <= decoders["ratio_ci_high"]
    assert rows["decoder", "d1"]["peers"] == "d2" and rows["decoder", "d1"]["action_p_value"] == 0.01
    assert rows["decoder", "d2"]["ratio_calibrated"] == pytest.approx(0.60 / 0.80)
    # An encoder family of one: no peers, said so.
    assert np.isnan(rows["encoder", "e1"]["peer_precision"]) and rows["encoder", "e1"]["peers"] == ""
    sentences = {f["family"]: f["sentence"] for f in result["families"]}
    # Every pair moves alike in each draw here, so the paired difference does not move at all.
    assert sentences["decoder"] == (
        "Decoders (d1, d2), last layers: agent~decoder 0.600 against decoder~decoder 0.850 (difference -0.250, "
        "95% CI [-0.250, -0.250]; calibrated 0.550 against 0.800): the agent is at 69% (95% CI 68%-69%) of "
        "the inter-decoder alignment, below the alignment among the decoders themselves.")
    assert "only one in the panel (e1)" in sentences["encoder"]
    assert "above the alignment among the vision-language models themselves" in sentences["vision-language"]


def test_baseline_says_level_when_the_interval_holds_zero():
    precision = {("agent", "d1"): 0.80, ("agent", "d2"): 0.80, ("d1", "d2"): 0.805}
    pairs, scores, boot = planted_scores(precision, paired=False)
    result = language_model_baseline(NAMES, KINDS, pairs, {"last": scores}, {"last": boot}, 0.95)
    decoder = next(f for f in result["families"] if f["family"] == "decoder")
    assert "level with the alignment among the decoders themselves" in decoder["sentence"]


def test_baseline_needs_an_action_space():
    pairs, scores, boot = planted_scores({})
    kinds = tuple("control" if kind == "action" else kind for kind in KINDS)
    assert language_model_baseline(NAMES, kinds, pairs, {"last": scores}, {"last": boot}, 0.95) == {
        "records": [], "families": []}


def test_the_stage_writes_the_baseline(tmp_path):
    """Two decoders that share the agent's neighbourhoods only in part, one encoder; kinds from meta."""
    rng = np.random.default_rng(5)
    n = 48
    base = rng.standard_normal((n, 6)).astype(np.float32)
    instructions = tuple(f"pick up the key {i}" for i in range(n))

    def table(x, meta):
        return EmbeddingTable(x.astype(np.float32), instructions, meta)

    noise = rng.standard_normal((3, n, 6)).astype(np.float32)
    tables = {"agent": table(base + 0.8 * noise[0], {"kind": "action"}),
              "lm_one": table(base + 10.0, {"kind": "decoder"}),  # a shared offset: anisotropic
              "lm_two": table(base + 0.2 * noise[1] + 10.0, {"kind": "decoder"}),
              "enc": table(base + 0.5 * noise[2], {"kind": "encoder"}),
              "words": table(rng.standard_normal((n, 4)), {"control": "bag_of_words"})}
    config = get_config("tiny").align
    summary = align_tables(tables, config, tmp_path)
    spaces = {s["name"]: s for s in summary["spaces"]}
    assert [spaces[name]["kind"] for name in tables] == ["action", "decoder", "decoder", "encoder", "control"]
    assert spaces["lm_one"]["mean_cosine"] > 0.9 > spaces["enc"]["mean_cosine"]
    with open(tmp_path / "baseline.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["layers"], r["family"], r["model"]) for r in rows} == {
        (which, family, model) for which in ("last", "best")
        for family, model in (("decoder", "lm_one"), ("decoder", "lm_two"), ("decoder", "mean"),
                              ("encoder", "enc"), ("encoder", "mean"))}
    pairs = {(p["a"], p["b"]): p["last"] for p in summary["pairs"]}
    decoder_mean = next(r for r in rows if r["layers"] == "last" and r["model"] == "mean"
                        and r["family"] == "decoder")
    assert float(decoder_mean["action_precision"]) == pytest.approx(
        (pairs["agent", "lm_one"]["precision"] + pairs["agent", "lm_two"]["precision"]) / 2)
    assert float(decoder_mean["peer_precision"]) == pytest.approx(pairs["lm_one", "lm_two"]["precision"])
    payload = json.loads((tmp_path / "baseline.json").read_text())
    written = json.loads((tmp_path / "summary.json").read_text())
    assert payload["families"] == written["baseline"] and payload["center"] is False
    assert written["baseline"][2]["peer_precision"] is None  # NaN: the encoder has no peer
    report = (tmp_path / "report.md").read_text()
    assert report.index("## Headline") < report.index("## Language-model baseline") < report.index("### Precision")
    assert summary["baseline"][0]["sentence"] in report


def test_a_row_at_the_mean_is_refused_once_centred(tmp_path):
    x = np.asarray([[3, 0], [0, 3], [1, 1], [2, 2], [1, 2]], np.float32)  # the mean row is [1.4, 1.6]: none
    x[2] = x.mean(0) * 5 / 4 - x[2] / 4  # now row 2 is the mean of all five
    instructions = tuple(f"open the door {i}" for i in range(5))
    tables = {"a": EmbeddingTable(x, instructions, {}), "b": EmbeddingTable(x[::-1].copy(), instructions, {})}
    config = get_config("tiny").align
    config.k, config.k_sweep, config.center = 2, (1,), True
    with pytest.raises(LvaaError, match=r"^a after centring \(config.align.center\): 1 zero-norm row\(s\), the first "
                                        "is row 2;"):
        align_tables(tables, config, tmp_path)
