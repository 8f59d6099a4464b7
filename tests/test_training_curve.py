"""Alignment over training from snapshot tables alone (the real run's curve is tested in test_pipeline.py)."""

import csv
import json

import numpy as np
import pytest

from configs.default import get_config
from lvaa_jax.agent.snapshots import snapshot_path
from lvaa_jax.alignment.training_curve import (
    HEADING,
    alignment_over_training,
    changes,
    score_snapshots,
    summary_sentence,
)
from lvaa_jax.embeddings import save_table
from lvaa_jax.embeddings.table import EmbeddingTable
from lvaa_jax.errors import LvaaError


def synthetic(n: int = 60, steps=(0, 5, 10)):
    """Snapshots that move from space ``start`` to space ``goal`` over the steps; ``other`` is unrelated."""
    rng = np.random.default_rng(0)
    instructions = tuple(f"instruction {i}" for i in range(n))
    start, goal, other = (rng.standard_normal((n, 16)).astype(np.float32) for _ in range(3))
    snapshots = {s: EmbeddingTable(start + s / steps[-1] * (goal - start), instructions, {}) for s in steps}
    spaces = {name: EmbeddingTable(x, instructions, {}) for name, x in (("start", start), ("goal", goal),
                                                                        ("other", other))}
    return snapshots, spaces


def align_config(k: int = 5):
    config = get_config().align
    config.k, config.permutations, config.bootstrap = k, 50, 100
    return config


def test_directions_come_from_the_bootstrap_of_the_paired_change():
    snapshots, spaces = synthetic()
    curve = score_snapshots(snapshots, spaces, align_config())
    assert curve.steps == (0, 5, 10) and curve.spaces == ("start", "goal", "other")
    assert curve.precision[0, 0] == curve.precision[-1, 1] == 1.0
    assert [curve.direction(j) for j in range(3)] == ["falls", "rises", "holds"]
    np.testing.assert_allclose(curve.null_mean, curve.chance, atol=0.03)
    np.testing.assert_allclose(curve.calibrated, curve.precision - curve.null_mean)
    text = summary_sentence(curve, {5: 0.5, 10: 0.75})
    assert text.startswith("From step 0 (the untrained agent) to step 10, precision@5 of the action space rises "
                           "against goal (")
    assert "; falls against start (1.000 → " in text and "; shows no clear change (the interval spans 0) against " \
        "other (" in text
    assert "From step 5 to step 10 (training accuracy 0.500 → 0.750), it rises against goal" in text
    assert [(c["from_step"], c["space"], c["direction"]) for c in changes(curve)] == [
        (0, "start", "falls"), (0, "goal", "rises"), (0, "other", "holds"),
        (5, "start", "falls"), (5, "goal", "rises"), (5, "other", "holds")]


def test_one_snapshot_has_no_change():
    snapshots, spaces = synthetic(steps=(7,))
    curve = score_snapshots(snapshots, spaces, align_config())
    assert curve.change_ci.shape == (1, 3, 2) and changes(curve) == []
    assert summary_sentence(curve) == "One snapshot only (step 7): no change over training to report."


def test_snapshots_of_another_instruction_list_are_not_scored(tmp_path):
    snapshots, spaces = synthetic()
    for name, table in spaces.items():
        save_table(tmp_path / "embeddings" / f"{name}.npz", table.embeddings, table.instructions, {})
    save_table(snapshot_path(tmp_path, 0), snapshots[0].embeddings, snapshots[0].instructions[::-1], {"step": 0})
    section = alignment_over_training(tmp_path, align_config(), tmp_path / "alignment")
    assert "Not scored" in section[HEADING] and not (tmp_path / "alignment" / "training_curve.csv").exists()
    assert alignment_over_training(tmp_path / "no_run", align_config(), tmp_path / "alignment") == {}


def test_tables_of_different_instruction_lists_are_a_user_error(tmp_path):
    snapshots, spaces = synthetic()
    for name, table in spaces.items():
        instructions = table.instructions[:-1] + ("another",) if name == "other" else table.instructions
        save_table(tmp_path / "embeddings" / f"{name}.npz", table.embeddings, instructions, {})
    save_table(snapshot_path(tmp_path, 0), snapshots[0].embeddings, snapshots[0].instructions, {"step": 0})
    with pytest.raises(LvaaError, match="other: instruction list differs from goal's"):
        alignment_over_training(tmp_path, align_config(), tmp_path / "alignment")


def clustered(kept_clusters: int, clusters: int = 12, size: int = 5) -> np.ndarray:
    """[clusters * size, clusters] tight clusters on orthogonal directions: each point's size - 1 nearest
    neighbours are its cluster mates. The first ``kept_clusters`` clusters are those of the goal partition
    (0-4, 5-9, ...); the others are regrouped so that every new cluster takes one point from each of ``size``
    different goal clusters, so their points share no neighbour with the goal's."""
    rest = clusters - kept_clusters
    assert rest == 0 or rest >= size
    group = np.arange(clusters * size) // size
    for j in range(size):  # point j of goal cluster i (i >= kept) joins new cluster kept + (i + j) mod rest
        members = np.arange(kept_clusters, clusters) * size + j
        group[members] = kept_clusters + (np.arange(rest) + j) % rest if rest else group[members]
    noise = np.random.default_rng(kept_clusters).normal(scale=1e-3, size=(clusters * size, clusters))
    return (np.eye(clusters)[group] + noise).astype(np.float32)


def test_snapshots_of_known_spaces_score_their_known_precision(tmp_path):
    """A snapshot sharing c of the goal's 12 clusters of 5 agrees with it on exactly c/12 of the points
    (k = 4: the cluster mates), whatever the step; the files carry those values."""
    instructions = tuple(f"instruction {i}" for i in range(60))
    kept = {0: 0, 100: 3, 200: 6, 300: 12}
    for step, c in kept.items():
        save_table(snapshot_path(tmp_path, step), clustered(c), instructions, {"step": step})
    goal = clustered(12)
    other = np.random.default_rng(1).standard_normal((60, 12)).astype(np.float32)
    for name, x in (("goal", goal), ("other", other)):
        save_table(tmp_path / "embeddings" / f"{name}.npz", x, instructions, {})
    section = alignment_over_training(tmp_path, align_config(k=4), tmp_path / "alignment")

    out = json.loads((tmp_path / "alignment" / "training_curve.json").read_text())
    assert out["steps"] == [0, 100, 200, 300] and out["spaces"] == ["goal", "other"]
    assert (out["n"], out["k"], out["chance"]) == (60, 4, pytest.approx(4 / 59))
    precision = {(r["step"], r["space"]): r["precision"] for r in out["records"]}
    assert [precision[step, "goal"] for step in kept] == [0.0, 0.25, 0.5, 1.0]
    assert all(abs(precision[step, "other"] - 4 / 59) < 0.1 for step in kept)
    with open(tmp_path / "alignment" / "training_curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "space", "precision", "calibrated", "null_mean", "null_sd", "p_value"]
    assert [(int(r["step"]), r["space"], float(r["precision"])) for r in rows] == [
        (s, space, precision[s, space]) for s in kept for space in ("goal", "other")]
    goal_changes = [c for c in out["changes"] if c["space"] == "goal"]
    assert [(c["from_step"], c["change"], c["direction"]) for c in goal_changes] == [
        (0, 1.0, "rises"), (100, 0.75, "rises"), (200, 0.5, "rises")]
    assert (tmp_path / "alignment" / "training_curve.png").stat().st_size > 0
    text = section[HEADING]
    assert "| 300 |  |  | **1.000** |" in text and "| 0 |  |  | 0.000 |" in text
    assert "rises against goal (0.000 → 1.000, +1.000" in text
