"""Alignment over training from snapshot tables alone (the real run's curve is tested in test_pipeline.py)."""

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
