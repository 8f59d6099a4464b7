"""Stage 1: pre-roll expert demos in worker processes, shard by shard, resumably."""

from __future__ import annotations

import concurrent.futures as futures
import json
import logging
import math
import multiprocessing
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import minigrid
import ml_collections

from lvaa_jax.babyai.dataset import (
    FORMAT_VERSION,
    MANIFEST,
    MISSIONS,
    VOCAB,
    DemoDataset,
    load_demos,
    shard_name,
    write_shard,
)
from lvaa_jax.babyai.levels import check_levels
from lvaa_jax.babyai.rollout import level_missions, roll_episodes
from lvaa_jax.babyai.tokenizer import Tokenizer
from lvaa_jax.errors import LvaaError
from lvaa_jax.files import sha256_file, write_json
from lvaa_jax.progress import progress_bar

log = logging.getLogger(__name__)
SETTINGS = "settings.json"


def demo_settings(config: ml_collections.ConfigDict) -> dict:
    """Everything the bytes of the dataset depend on; a resumed run must match it exactly."""
    data = config.data
    for key in ("episodes_per_level", "episodes_per_shard"):
        if int(data[key]) < 1:
            raise LvaaError(f"config.data.{key} must be at least 1, got {data[key]}")
    if int(data.census_resets) < 0 or int(data.num_workers) < 0:
        raise LvaaError("config.data.census_resets and config.data.num_workers must not be negative")
    return {
        "format_version": FORMAT_VERSION,
        "minigrid_version": minigrid.__version__,
        "levels": check_levels(data.levels),
        "seed": int(config.seed),
        "episodes_per_level": int(data.episodes_per_level),
        "episodes_per_shard": int(data.episodes_per_shard),
        "census_resets": int(data.census_resets),
    }


def make_demos(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> DemoDataset:
    """Writes ``<workdir>/demos`` (see dataset.py for the format) and returns it loaded.

    Interrupted runs continue from their finished shards; a finished dataset is returned as is.
    """
    settings = demo_settings(config)
    demos = Path(workdir) / "demos"
    try:
        demos.mkdir(parents=True, exist_ok=True)
        _check_same_settings(demos, settings)
    except PermissionError as e:
        raise LvaaError(f"--workdir: cannot write to {e.filename or demos}: permission denied") from None
    except OSError as e:
        raise LvaaError(f"--workdir: cannot write to {demos}: {e.strerror}") from None
    if (demos / MANIFEST).exists():
        log.info("demos in %s are complete; nothing to do", demos)
        return load_demos(demos)

    levels = settings["levels"]
    for stale in demos.glob("shard_*.tmp"):  # half-written by a killed run
        shutil.rmtree(stale)
    with _pool(int(config.data.num_workers)) as submit:
        if not (demos / MISSIONS).exists():
            _write_missions(demos, settings, submit, progress)
        mission_ids = {m: i for i, m in enumerate(json.loads((demos / MISSIONS).read_text())["missions"])}
        jobs = [(g % len(levels), g // len(levels)) for g in range(len(levels) * settings["episodes_per_level"])]
        size = settings["episodes_per_shard"]
        todo = [i for i in range(math.ceil(len(jobs) / size)) if not (demos / shard_name(i) / "shard.json").exists()]
        pending = [
            submit(_make_shard, demos / shard_name(i), levels, jobs[i * size : (i + 1) * size], settings["seed"], mission_ids)
            for i in todo
        ]
        with progress_bar(total=len(jobs), initial=len(jobs) - sum(len(jobs[i * size : (i + 1) * size]) for i in todo),
                  unit="ep", desc="expert demos", disable=not progress) as bar:
            for done in futures.as_completed(pending):
                bar.update(done.result())
    _write_manifest(demos, settings)
    return load_demos(demos)


def summary_table(dataset: DemoDataset) -> str:
    """Per-level episodes, steps, bot failures and missions, as printed after generation."""
    counts = dataset.manifest["counts"]
    lines = [f"demos in {dataset.path}: {dataset.num_episodes} episodes, {len(dataset.missions)} missions in the census",
             f"{'level':32s} {'episodes':>8s} {'steps':>8s} {'mean len':>8s} {'failures':>8s} {'missions':>8s}"]
    for level in dataset.levels:
        c = counts[level]
        lines.append(f"{level:32s} {c['episodes']:8d} {c['steps']:8d} {c['steps'] / max(c['episodes'], 1):8.1f} "
                     f"{c['failures']:8d} {c['missions']:8d}")
    return "\n".join(lines)


def _check_same_settings(demos: Path, settings: dict) -> None:
    path = demos / SETTINGS
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise LvaaError(
                f"{demos} holds demos made with other settings ({', '.join(changed)} differ); "
                "use another --workdir or delete that folder"
            )
    else:
        write_json(path, settings)


def _write_missions(demos: Path, settings: dict, submit: Callable, progress: bool) -> None:
    pending = [
        submit(level_missions, level, settings["seed"], settings["episodes_per_level"], settings["census_resets"])
        for level in settings["levels"]
    ]
    for _ in progress_bar(futures.as_completed(pending), total=len(pending), desc="mission census", unit="level",
                  disable=not progress):
        pass
    by_level = {level: done.result() for level, done in zip(settings["levels"], pending, strict=True)}
    missions = sorted({m for level_missions in by_level.values() for m in level_missions})
    Tokenizer.from_missions(missions).save(demos / VOCAB)
    ids = {m: i for i, m in enumerate(missions)}
    write_json(demos / MISSIONS, {"missions": missions, "by_level": {k: [ids[m] for m in v] for k, v in by_level.items()}})


def _make_shard(directory: Path, levels: list[str], jobs: list[tuple[int, int]], seed: int,
                mission_ids: dict[str, int]) -> int:
    episodes, failures = roll_episodes(levels, jobs, seed)
    write_shard(directory, episodes, mission_ids, levels)
    per_level = Counter(e.level for e in episodes)
    steps = Counter()
    for e in episodes:
        steps[e.level] += len(e.action)
    write_json(directory / "counts.json", {
        level: {"episodes": per_level[level], "steps": steps[level], "failures": failures[level]} for level in levels
    })
    return len(jobs)


def _write_manifest(demos: Path, settings: dict) -> None:
    shards = {p.name: json.loads((p / "shard.json").read_text()) for p in sorted(demos.glob("shard_?????"))}
    missions = json.loads((demos / MISSIONS).read_text())
    counts = {level: Counter() for level in settings["levels"]}
    for name in shards:
        for level, c in json.loads((demos / name / "counts.json").read_text()).items():
            counts[level].update(c)
    manifest = {
        **settings,
        "counts": {level: {k: int(counts[level][k]) for k in ("episodes", "steps", "failures")}
                   | {"missions": len(missions["by_level"][level])} for level in settings["levels"]},
        "num_missions": len(missions["missions"]),
        "shards": shards,
        "files": {name: {"sha256": sha256_file(demos / name), "bytes": (demos / name).stat().st_size}
                  for name in (MISSIONS, VOCAB)},
    }
    write_json(demos / MANIFEST, manifest)


class _pool:
    """``submit`` into worker processes (spawned: safe when JAX is already imported), or inline for 0."""

    def __init__(self, workers: int):
        self.executor = (
            futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers else None
        )

    def __enter__(self) -> Callable[..., futures.Future]:
        if self.executor is not None:
            return self.executor.submit

        def inline(fn, *args):
            future = futures.Future()
            future.set_result(fn(*args))
            return future

        return inline

    def __exit__(self, exc_type, *_) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=exc_type is None, cancel_futures=True)
