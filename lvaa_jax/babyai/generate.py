"""Stage 1: pre-roll expert demos in worker processes, shard by shard, resumably."""

from __future__ import annotations

import concurrent.futures as futures
import ctypes
import logging
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
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
from lvaa_jax.config_checks import NON_NEGATIVE_INT, POSITIVE_INT, check_section
from lvaa_jax.distributed import on_process_zero
from lvaa_jax.errors import LvaaError
from lvaa_jax.files import read_json, sha256_file, write_json
from lvaa_jax.progress import progress_bar
from lvaa_jax.runlock import holds_run_folder

log = logging.getLogger(__name__)
SETTINGS = "settings.json"
REMAKE = "delete it and run make_demos again"
REMAKE_SHARD = "delete that shard's folder and run make_demos again"
# Where each entry of the settings comes from in the config.
SETTING_KEYS = {"levels": "data.levels", "seed": "seed", "episodes_per_level": "data.episodes_per_level",
                "episodes_per_shard": "data.episodes_per_shard", "census_resets": "data.census_resets"}


def demo_settings(config: ml_collections.ConfigDict) -> dict:
    """Everything the bytes of the dataset depend on; a resumed run must match it exactly."""
    check_section(config, "", seed=NON_NEGATIVE_INT)
    check_section(config, "data", episodes_per_level=POSITIVE_INT, episodes_per_shard=POSITIVE_INT,
                  num_workers=NON_NEGATIVE_INT, census_resets=NON_NEGATIVE_INT)
    data = config.data
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

    Interrupted runs continue from their finished shards; a finished dataset is returned as is. In a job
    of several processes, process 0 makes them (in its worker processes) and the others wait to load them.
    """
    settings = demo_settings(config)
    return _make_demos(config, settings, Path(workdir), progress)


@holds_run_folder
def _make_demos(config: ml_collections.ConfigDict, settings: dict, workdir: Path, progress: bool) -> DemoDataset:
    on_process_zero(lambda: _write_demos(config, settings, workdir / "demos", progress), "the demos")
    return load_demos(workdir / "demos")


def _write_demos(config: ml_collections.ConfigDict, settings: dict, demos: Path, progress: bool) -> None:
    demos.mkdir(parents=True, exist_ok=True)
    _check_same_settings(demos, settings)
    for stale in [*demos.glob("shard_*.tmp"), *demos.glob("*.json.tmp")]:  # half-written by a killed run
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if (demos / MANIFEST).exists():
        log.info("demos in %s are complete; nothing to do", demos)
        return

    levels = settings["levels"]
    with _pool(int(config.data.num_workers)) as submit:
        if not (demos / MISSIONS).exists():
            _write_missions(demos, settings, submit, progress)
        mission_ids = {m: i for i, m in enumerate(read_json(demos / MISSIONS, REMAKE)["missions"])}
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


def check_demos_match(config: ml_collections.ConfigDict, dataset: DemoDataset) -> None:
    """Refuses demos made with other data settings than ``config``'s: an agent trained on them would carry
    a config (in its checkpoint, in the report) that describes other data than it saw."""
    wanted = demo_settings(config)
    made = dataset.manifest
    changed = [f"config.{SETTING_KEYS[k]}={made.get(k)!r}, not {wanted[k]!r}" for k in SETTING_KEYS
               if made.get(k) != wanted[k]]
    if changed:
        raise LvaaError(
            f"{dataset.path} holds demos made with {'; '.join(changed)}; use the settings the demos were made "
            "with, or make demos for this config in another --workdir"
        )


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
        previous = read_json(path, "it records what these demos were made with: delete the folder to make them again")
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
    per_level = Counter(e.level for e in episodes)
    steps = Counter()
    for e in episodes:
        steps[e.level] += len(e.action)
    counts = {level: {"episodes": per_level[level], "steps": steps[level], "failures": failures[level]}
              for level in levels}
    write_shard(directory, episodes, mission_ids, levels, {"counts.json": counts})
    return len(jobs)


def _write_manifest(demos: Path, settings: dict) -> None:
    shards = {p.name: read_json(p / "shard.json", REMAKE_SHARD) for p in sorted(demos.glob("shard_?????"))}
    missions = read_json(demos / MISSIONS, REMAKE)
    counts = {level: Counter() for level in settings["levels"]}
    for name in shards:
        for level, c in read_json(demos / name / "counts.json", REMAKE_SHARD).items():
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


def _end_with_parent(parent: int) -> None:
    """Worker initializer: the worker ends when the process that started it ends, even by SIGKILL (which
    gives it no chance to stop its pool); else orphaned workers would sit blocked, and the resource tracker
    with them (it exits once every holder of its pipe has)."""
    if sys.platform.startswith("linux"):
        # The kernel signals the worker when the thread that started it exits: the thread that submits.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


class _pool:
    """``submit`` into worker processes (spawned: safe when JAX is already imported), or inline for 0."""

    def __init__(self, workers: int):
        self.executor = (
            futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_end_with_parent, initargs=(os.getpid(),))
            if workers else None
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
