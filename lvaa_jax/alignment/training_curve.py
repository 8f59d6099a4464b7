"""Alignment over training: precision@k of the action space's snapshots against every other space.

The snapshots (``lvaa_jax.agent.snapshots``) hold the action space at step 0 (the untrained agent), every
``train.snapshot_every`` steps and at the last step (equal to the ``action`` table). Each is scored at its
last layer against every other space of the study at its last layer, the way the headline pairs are:
neighbours once per space, overlaps of every (snapshot, space) pair in one batched kernel, and the
permutation null from the same relabellings as the headline (same key), so the last snapshot's row repeats
the headline's last-layer scores exactly.

Whether a pair rises or falls between the first and last snapshot is read from a bootstrap interval of the
paired change (the same instructions scored at both steps), not from the permutation null: the null says
how far one score is from chance, not how much a score moves with the choice of instructions.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lvaa_jax.alignment import report
from lvaa_jax.alignment.knn import knn_indices, overlap_counts, overlap_totals
from lvaa_jax.alignment.stage import CI_LEVEL, Settings, _check_instructions
from lvaa_jax.alignment.stats import bootstrap_means, p_values, percentile_interval, permutation_null
from lvaa_jax.embeddings.table import EmbeddingTable, load_table

log = logging.getLogger(__name__)
HEADING = "Alignment over training"
STEM = "training_curve"


@dataclasses.dataclass(frozen=True)
class Curve:
    """precision@k of the action space at each snapshot step [S] against each other space [M]."""

    steps: tuple[int, ...]
    spaces: tuple[str, ...]
    n: int
    k: int
    precision: np.ndarray  # [S, M]
    null_mean: np.ndarray  # [S, M] mean of the permutation null
    null_sd: np.ndarray  # [S, M] its standard deviation
    p_value: np.ndarray  # [S, M] one-sided, (1 + #{null >= raw}) / (1 + permutations)
    change_ci: np.ndarray  # [S, M, 2] bootstrap interval of the last snapshot's score minus each snapshot's

    @property
    def chance(self) -> float:
        return self.k / (self.n - 1)

    @property
    def calibrated(self) -> np.ndarray:
        return self.precision - self.null_mean

    def direction(self, space: int, since: int = 0) -> str:
        """'rises', 'falls' or 'holds' from snapshot ``since`` to the last: whether the interval of the change
        excludes zero, and on which side."""
        low, high = self.change_ci[since, space]
        return "rises" if low > 0 else "falls" if high < 0 else "holds"

    def records(self) -> list[dict]:
        return [{"step": step, "space": space, "precision": float(self.precision[i, j]),
                 "calibrated": float(self.calibrated[i, j]), "null_mean": float(self.null_mean[i, j]),
                 "null_sd": float(self.null_sd[i, j]), "p_value": float(self.p_value[i, j])}
                for i, step in enumerate(self.steps) for j, space in enumerate(self.spaces)]


def score_snapshots(snapshots: Mapping[int, EmbeddingTable], spaces: Mapping[str, EmbeddingTable],
                    config: ml_collections.ConfigDict) -> Curve:
    """Scores every snapshot (by step) against every space, each at its last layer; ``config`` is the
    ``align`` section (k, permutations, bootstrap, centring, clamp, block size, seed)."""
    steps, names = sorted(snapshots), tuple(spaces)
    labelled = [(f"action at step {step}", snapshots[step]) for step in steps] + [(n, spaces[n]) for n in names]
    n = len(labelled[0][1].instructions)
    s = Settings.from_config(config, n)
    neighbours = []
    for label, table in labelled:
        neighbours.append(knn_indices(s.prepare(table.layer(-1), label), s.k, block_size=s.block_size, name=label))
    indices = jnp.stack(neighbours)
    count, m = len(steps), len(names)
    pairs = np.asarray([(i, count + j) for i in range(count) for j in range(m)], np.int32)
    raw = np.asarray(overlap_totals(indices, indices, jnp.asarray(pairs)))
    key = jax.random.key(s.seed)
    null = permutation_null(indices, pairs, jax.random.fold_in(key, 0), s.permutations)  # the headline's draws
    scale = n * s.k
    # Paired changes: per-instruction overlaps of the last snapshot minus those of each snapshot, resampled.
    counts = overlap_counts(indices, indices, jnp.asarray(pairs))
    changes = (counts[-m:][None] - counts.reshape(count, m, n)).reshape(count * m, n)
    boot = bootstrap_means(changes, jax.random.fold_in(key, 1), s.bootstrap) / s.k
    change_ci = np.stack(percentile_interval(boot, CI_LEVEL), axis=-1).reshape(count, m, 2)
    shape = (count, m)
    return Curve(tuple(steps), names, n, s.k, (raw / scale).reshape(shape), (null.mean(0) / scale).reshape(shape),
                 (null.std(0) / scale).reshape(shape), p_values(raw, null).reshape(shape), change_ci)


def alignment_over_training(workdir: str | Path, config: ml_collections.ConfigDict, out_dir: str | Path,
                            tables: Mapping[str, EmbeddingTable] | None = None) -> dict[str, str]:
    """Scores the snapshots of ``<workdir>`` against ``tables`` (default: every table in
    ``<workdir>/embeddings``) but ``action``; writes ``training_curve.csv``, ``.json`` and ``.png`` to
    ``out_dir`` and returns the report section {heading: Markdown}, or {} when the run has no snapshots."""
    from lvaa_jax.agent.snapshots import load_snapshots  # the agent (and minigrid) only where a run is read

    workdir, out_dir = Path(workdir), Path(out_dir)
    if tables is None:
        tables = {p.stem: load_table(p) for p in sorted((workdir / "embeddings").glob("*.npz"))}
    snapshots = load_snapshots(workdir)
    action = tables.get("action")
    if action is not None:  # this training run's snapshots, up to the checkpoint the action table holds
        snapshots = {step: t for step, t in snapshots.items()
                     if t.meta.get("config_sha256") == action.meta.get("config_sha256")
                     and step <= action.meta.get("checkpoint_step", step)}
    spaces = {name: table for name, table in tables.items() if name != "action"}
    if not snapshots or not spaces:
        return {}
    _check_instructions(spaces)  # the tables among themselves: a user error, as in align_tables
    reference = next(iter(spaces.values())).instructions
    if any(t.instructions != reference for t in snapshots.values()):
        log.warning("%s: the snapshots embed another instruction list than the tables; not scored", workdir)
        return {HEADING: "Not scored: the snapshots of training embed another instruction list than the "
                         "embedding tables (was `config.embed.instructions` changed after training?). Snapshots "
                         "are recorded while the agent trains; train again in a fresh run folder to score these "
                         "instructions."}
    start = time.perf_counter()
    curve = score_snapshots(snapshots, spaces, config)
    accuracy, success = training_accuracy(workdir), success_rates(workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reading = summary_sentence(curve, accuracy)
    report.write_records(out_dir, STEM, curve.records(), n=curve.n, k=curve.k, chance=curve.chance,
                         steps=list(curve.steps), spaces=list(curve.spaces), changes=changes(curve),
                         train_accuracy=accuracy, success_rate=success, summary=reading)
    plot(out_dir / f"{STEM}.png", curve, accuracy, success)
    log.info("alignment over %d snapshots of training written to %s (%.1f s)", len(curve.steps),
             out_dir / f"{STEM}.csv", time.perf_counter() - start)
    return {HEADING: render(curve, accuracy, success, reading)}


def console_table(out_dir: str | Path) -> str:
    """The curve as the pipeline prints it: one line per space, precision@k at each snapshot step; "" when
    ``out_dir`` has no curve (a run without snapshots)."""
    path = Path(out_dir) / f"{STEM}.json"
    if not path.exists():
        return ""
    curve = json.loads(path.read_text())
    steps = curve["steps"]
    values = {(r["step"], r["space"]): r["precision"] for r in curve["records"]}
    lines = [f"action space over training: precision@{curve['k']} at each snapshot step (figure: {path.with_suffix('.png')})",
             f"{'step':16s} " + " ".join(f"{step:>6d}" for step in steps)]
    lines += [f"{space[:16]:16s} " + " ".join(f"{values[step, space]:6.3f}" for step in steps)
              for space in curve["spaces"]]
    return "\n".join(lines)


def training_accuracy(workdir: Path) -> dict[int, float]:
    """Step -> behavioural-cloning accuracy, as logged in ``metrics/train.csv`` (empty when absent)."""
    path = workdir / "metrics" / "train.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {int(row["step"]): float(row["accuracy"]) for row in csv.DictReader(f)}


def success_rates(workdir: Path) -> dict[int, float]:
    """Step -> closed-loop success (mean over levels) of every evaluation in ``eval/step_*.json``."""
    rates = {}
    for path in (workdir / "eval").glob("step_*.json"):
        record = json.loads(path.read_text())
        rates[int(record["step"])] = float(record["mean_success_rate"])
    return dict(sorted(rates.items()))


def changes(curve: Curve) -> list[dict]:
    """From every snapshot but the last to the last: the two scores, the change and its interval, per space."""
    return [{"space": space, "from_step": curve.steps[i], "to_step": curve.steps[-1],
             "from": float(curve.precision[i, j]), "to": float(curve.precision[-1, j]),
             "change": float(curve.precision[-1, j] - curve.precision[i, j]),
             "ci_low": float(curve.change_ci[i, j, 0]), "ci_high": float(curve.change_ci[i, j, 1]),
             "direction": curve.direction(j, since=i)}
            for i in range(len(curve.steps) - 1) for j, space in enumerate(curve.spaces)]


def summary_sentence(curve: Curve, accuracy: Mapping[int, float] | None = None) -> str:
    """What the curve shows, from the numbers: which spaces the action space moves towards or away from, from
    the first snapshot to the last and, when the first is the untrained agent, from the second (the agent
    getting better, rather than learning at all)."""
    steps = curve.steps
    if len(steps) < 2:
        return f"One snapshot only (step {steps[0]}): no change over training to report."
    out = [f"From step {steps[0]}{' (the untrained agent)' if steps[0] == 0 else ''} to step {steps[-1]}, "
           f"precision@{curve.k} of the action space {_moves(curve, 0)}."]
    if steps[0] == 0 and len(steps) > 2:
        accuracy = accuracy or {}
        gain = (f" (training accuracy {accuracy[steps[1]]:.3f} → {accuracy[steps[-1]]:.3f})"
                if steps[1] in accuracy and steps[-1] in accuracy else "")
        out.append(f"From step {steps[1]} to step {steps[-1]}{gain}, it {_moves(curve, 1)}.")
    out.append(f"Intervals: {CI_LEVEL:.0%} bootstrap over instructions of the paired change.")
    return " ".join(out)


def _moves(curve: Curve, since: int) -> str:
    groups: dict[str, list[str]] = {"rises": [], "falls": [], "holds": []}
    for j, space in enumerate(curve.spaces):
        before, after = curve.precision[since, j], curve.precision[-1, j]
        low, high = curve.change_ci[since, j]
        groups[curve.direction(j, since)].append(
            f"{space} ({before:.3f} → {after:.3f}, {after - before:+.3f} [{low:+.3f}, {high:+.3f}])")
    wording = {"rises": "rises against", "falls": "falls against",
               "holds": "shows no clear change (the interval spans 0) against"}
    return "; ".join(f"{wording[d]} {', '.join(items)}" for d, items in groups.items() if items)


def render(curve: Curve, accuracy: Mapping[int, float], success: Mapping[int, float], reading: str) -> str:
    """The report section: what was scored, the table of steps x spaces, and the reading."""
    best = curve.precision.argmax(0)
    rows = [[step, _value(accuracy.get(step)), _value(success.get(step)),
             *(f"**{v:.3f}**" if i == best[j] else f"{v:.3f}" for j, v in enumerate(curve.precision[i]))]
            for i, step in enumerate(curve.steps)]
    intro = (
        f"The action space recorded at {len(curve.steps)} steps of training (step 0: the untrained agent; the last: "
        f"the `action` table), each scored against every other space at last layers: precision@{curve.k} over "
        f"N = {curve.n} instructions, chance k/(N-1) = {curve.chance:.3f}. Permutation nulls: mean "
        f"{_span(curve.null_mean)}, standard deviation at most "
        f"{curve.null_sd.max():.3f}, at every step and space; the calibrated scores (raw minus the null's mean) "
        f"and p-values are in `{STEM}.csv`. In bold, each space's highest value. Training accuracy: the "
        f"behavioural-cloning accuracy logged at that step; success: closed-loop success, mean over levels, "
        f"where evaluated (`train.eval_every`). Figure: `{STEM}.png`."
    )
    table = report.markdown_table(["step", "train accuracy", "success", *curve.spaces], rows)
    return "\n\n".join([intro, table, reading])


def _span(values: np.ndarray) -> str:
    low, high = f"{values.min():.3f}", f"{values.max():.3f}"
    return low if low == high else f"{low}–{high}"


def _value(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def plot(path: Path, curve: Curve, accuracy: Mapping[int, float], success: Mapping[int, float]) -> None:
    """Top: precision@k against each space over training steps, with chance. Bottom, on the same steps: the
    training accuracy and, where evaluated, the closed-loop success."""
    many = len(curve.spaces) > 8
    fig = Figure(figsize=(8.4 if many else 6.4, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    colours = matplotlib.colormaps["tab20" if len(curve.spaces) > 10 else "tab10"].colors
    for colour, (j, space) in zip(itertools.cycle(colours), enumerate(curve.spaces)):
        top.plot(curve.steps, curve.precision[:, j], marker="o", markersize=3, label=space, color=colour)
    top.axhline(curve.chance, color="grey", linestyle="--", linewidth=1, label="chance k/(N-1)")
    top.set_ylabel(f"precision@{curve.k} with the action space")
    top.set_title("The action space over training (last layers)")
    if many:
        top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncols=2 if len(curve.spaces) > 16 else 1)
    else:
        top.legend(fontsize=8)
    if accuracy:
        bottom.plot(list(accuracy), list(accuracy.values()), color="tab:blue", label="training accuracy")
    if success:
        bottom.plot(list(success), list(success.values()), color="tab:red", marker="s", markersize=4,
                    label="closed-loop success (mean over levels)")
    bottom.set_ylim(-0.03, 1.03)  # a success of 0 stays visible
    bottom.set_ylabel("fraction")
    bottom.set_xlabel("training step")
    if len(curve.steps) <= 12:
        bottom.set_xticks(curve.steps)  # shared with the top panel: a tick at every snapshot
    else:
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    if accuracy or success:
        bottom.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=120)
