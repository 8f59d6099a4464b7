"""The whole study in one call: demos -> agent -> embeddings -> alignment report.

Each stage is skipped when its artifacts are complete and valid for this config (demos: manifest and
checksums; training: the final checkpoint and evaluation; embeddings: each table's identity; alignment:
the hash of every input table and of the align settings), and resumes where an interrupted run stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import time
from importlib import metadata
from pathlib import Path

import jax
import ml_collections

from lvaa_jax.distributed import is_primary, on_process_zero
from lvaa_jax.files import log_to_file, sha256_file, write_json
from lvaa_jax.runlock import hold_run_folder

log = logging.getLogger(__name__)
STAGES = ("demos", "train", "embed", "align")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "minigrid", "numpy", "transformers", "torch")


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> Path:
    """Runs (or finishes) every stage in ``workdir`` and returns the path of ``alignment/report.md``.

    The settings of the first three stages are checked before any of them starts (alignment's bounds
    depend on the number of instructions, known only after the demos). In a job of several processes
    every process calls it, and each stage shares its work out (docs/distributed.md).
    """
    from lvaa_jax.agent.train import check_settings
    from lvaa_jax.babyai.generate import demo_settings
    from lvaa_jax.embeddings.stage import check_embed_settings

    demo_settings(config)
    check_settings(config)
    check_embed_settings(config)
    with hold_run_folder(workdir):
        return _run_stages(config, Path(workdir), progress)


def _run_stages(config: ml_collections.ConfigDict, workdir: Path, progress: bool) -> Path:
    from lvaa_jax.agent import train_and_evaluate
    from lvaa_jax.babyai import make_demos
    from lvaa_jax.embeddings import embed_instructions, load_table

    record_path = workdir / "pipeline.json"  # seconds per stage of every invocation, the last one in progress
    record = on_process_zero(lambda: _new_record(record_path), f"{record_path}")
    seconds: dict[str, float] = record["runs"][-1]["seconds"]
    # In a job of several processes, each stage shares its work out itself; process 0 keeps the log.
    with log_to_file(workdir / "logs" / "pipeline.log") if is_primary() else contextlib.nullcontext():
        evaluation = tables = None
        for stage in STAGES:
            log.info("stage %s", stage)
            start = time.perf_counter()
            if stage == "demos":
                make_demos(config, workdir, progress)
            elif stage == "train":
                evaluation = train_and_evaluate(config, workdir, progress)
            elif stage == "embed":
                tables = {name: load_table(path) for name, path in embed_instructions(config, workdir, progress).items()}
            else:
                _align(config, workdir, tables, evaluation, record)
            seconds[stage] = round(time.perf_counter() - start, 1)
            on_process_zero(lambda: write_json(record_path, record), f"{record_path}")
    return workdir / "alignment" / "report.md"


def _align(config: ml_collections.ConfigDict, workdir: Path, tables: dict, evaluation: dict, record: dict) -> None:
    """The alignment stage, unless ``alignment/`` was written from these tables and settings."""
    from lvaa_jax.alignment import align_tables
    from lvaa_jax.alignment.training_curve import alignment_over_training

    out = workdir / "alignment"
    inputs = on_process_zero(lambda: _alignment_inputs(config, workdir), "the alignment's inputs")
    if on_process_zero(lambda: _written_for(out, inputs), f"{out / 'inputs.json'}"):
        log.info("alignment of these tables is up to date in %s", out)
        return
    sections = on_process_zero(lambda: {**alignment_over_training(workdir, config.align, out, tables),
                                        **_report_sections(config, workdir, evaluation, record)}, "the report's sections")
    align_tables(tables, config.align, out, sections)
    on_process_zero(lambda: write_json(out / "inputs.json", inputs), f"{out / 'inputs.json'}")


def _written_for(out: Path, inputs: dict) -> bool:
    """Whether the alignment in ``out`` was written from these inputs."""
    return (out / "inputs.json").exists() and json.loads((out / "inputs.json").read_text()) == inputs


def _new_record(path: Path) -> dict:
    """``pipeline.json`` with this invocation appended, its stages' seconds still empty."""
    record = json.loads(path.read_text()) if path.exists() else {"runs": []}
    record["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": {}})
    return record


def headline(report_dir: Path, space: str = "action") -> str:
    """The console table: ``space`` against every other space, at last layers and at the best layer pair;
    then the language-model baseline at the last layers."""
    summary = json.loads((report_dir / "summary.json").read_text())
    lines = [f"precision@{summary['k']} over N = {summary['n']} instructions (chance {summary['chance']:.3f})",
             f"{'':16s} {'last':>6s} {'calib.':>7s} {'best':>6s} {'layers':>7s}"]
    for pair in summary["pairs"]:
        if space not in (pair["a"], pair["b"]):
            continue
        other = pair["b"] if pair["a"] == space else pair["a"]
        last, best = pair["last"], pair["best"]
        layers = "/".join(map(str, best["layers"] if pair["a"] == space else best["layers"][::-1]))
        lines.append(f"{space[:7]}~{other[:8]:8s} {last['precision']:6.3f} {last['calibrated']:+7.3f} "
                     f"{best['precision']:6.3f} {layers:>7s}")
    lines += [family["sentence"] for family in summary.get("baseline", [])
              if family["layers"] == "last" and family["action"] == space]
    return "\n".join(lines)


def _alignment_inputs(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    tables = sorted((workdir / "embeddings").glob("*.npz"))
    snapshots = sorted((workdir / "snapshots").glob("*.npz"))
    return {"tables": {p.stem: sha256_file(p) for p in tables}, "align": json.loads(config.align.to_json()),
            "snapshots": {p.stem: sha256_file(p) for p in snapshots},
            "eval": sorted(p.name for p in (workdir / "eval").glob("step_*.json"))}


def _report_sections(config, workdir: Path, evaluation: dict, record: dict) -> dict[str, str]:
    """The agent's closed-loop success and the run's metadata, appended to report.md."""
    rows = ["| level | episodes | success rate | mean return | mean length |", "| --- | --- | --- | --- | --- |"]
    for level, r in evaluation["levels"].items():
        rows.append(f"| {level} | {r['episodes']} | {r['success_rate']:.3f} | {r['mean_return']:.3f} | "
                    f"{r['mean_length']:.1f} |")
    rows.append(f"| mean | | {evaluation['mean_success_rate']:.3f} | | |")
    flags = json.loads((workdir / "embeddings" / "instructions.json").read_text())
    unseen = flags["unseen_in_training"]
    instructions = (
        f"{flags['count']} instructions (sha256 {flags['sha256'][:12]}). "
        + (f"{len(unseen)} never appear in the agent's training demos: "
           + ", ".join(f"'{s}'" for s in unseen[:20]) + (" ..." if len(unseen) > 20 else "") + "."
           if unseen else "Every one appears in the agent's training demos.")
        + (f" Words outside the agent's vocabulary: {flags['unknown_words']}." if flags["unknown_words"] else "")
    )
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    timings = "; ".join(
        f"run {i + 1} ({run['started']}): " + ", ".join(f"{stage} {s:.0f}" for stage, s in run["seconds"].items())
        for i, run in enumerate(record["runs"])
    )
    config_hash = hashlib.sha256(config.to_json().encode()).hexdigest()[:12]
    meta = "\n".join([
        f"- config: `{config.name}` (sha256 {config_hash}), seed {config.seed}; full config in "
        f"`{workdir / 'checkpoints' / 'config.json'}`",
        f"- devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"Python {platform.python_version()} on {platform.machine()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- seconds per stage (a stage that found its work done takes seconds; align of the last run is "
        f"still running when this is written): {timings}",
    ])
    return {"Agent: closed-loop success (evaluation seeds never used in training)": "\n".join(rows),
            "Instructions": instructions, "Run metadata": meta}
