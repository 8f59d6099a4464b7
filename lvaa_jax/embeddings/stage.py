"""Stage 3: embed the instruction set in every space of the panel, one table per space.

Spaces (each table's meta records its ``kind``: ``action``, ``control``, or the model's kind): ``action``
(the trained agent's instruction pathway, every layer), the controls
``untrained_agent`` (same architecture at its initial parameters), ``bag_of_words`` and ``random``, and
each language or vision-language model of ``config.embed.models``. A space whose table already exists
with the same identity (model, weights hash, pooling, layers, checkpoint, instruction list) is skipped.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from lvaa_jax.config_checks import POSITIVE_INT, check_section
from lvaa_jax.distributed import on_process_zero
from lvaa_jax.embeddings.controls import bag_of_words, check_instructions, random_gaussian
from lvaa_jax.embeddings.table import instructions_hash, read_meta, save_table
from lvaa_jax.errors import LvaaError
from lvaa_jax.files import sha256_file, write_json
from lvaa_jax.progress import progress_bar
from lvaa_jax.runlock import holds_run_folder

log = logging.getLogger(__name__)
CONTROLS = ("untrained_agent", "bag_of_words", "random")
AGENT_SPACES = ("action", "untrained_agent")


@dataclasses.dataclass(frozen=True)
class Space:
    """A space to embed: what identifies its table (cheap to compute) and how to compute the table."""

    name: str
    identity: dict[str, Any]
    compute: Callable[[], tuple[np.ndarray, dict[str, Any]]]


def instruction_set(config: ml_collections.ConfigDict, workdir: Path) -> list[str]:
    """Every mission of the configured levels (the demo census), or the lines of a user file; sorted."""
    source = config.embed.instructions
    if source:
        path = Path(source)
        if not path.is_file():
            raise LvaaError(f"config.embed.instructions: no such file {path}")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return sorted(check_instructions(lines, str(path)))
    missions = workdir / "demos" / "missions.json"
    if not missions.exists():
        raise LvaaError(f"{missions}: missing; run scripts/make_demos.py first (or set config.embed.instructions)")
    return sorted(json.loads(missions.read_text())["missions"])


def flag_instructions(instructions: list[str], workdir: Path) -> dict[str, Any]:
    """Which instructions the agent never trained on, and which hold words outside its vocabulary."""
    from lvaa_jax.babyai import load_demos

    demos = load_demos(workdir / "demos", verify=False)
    seen = demos.seen_missions()
    unseen = [s for s in instructions if s not in seen]
    unknown = {s: demos.tokenizer.unknown_words(s) for s in instructions if demos.tokenizer.unknown_words(s)}
    return {"count": len(instructions), "sha256": instructions_hash(instructions),
            "unseen_in_training": unseen, "unknown_words": unknown}


def _agent_space(name: str, workdir: Path, instructions: list[str]) -> Space:
    from lvaa_jax.agent import restore_agent

    trained = name == "action"
    checkpoints = workdir / "checkpoints"
    config_file = checkpoints / "config.json"
    if not config_file.exists():
        raise LvaaError(f"{checkpoints}: no trained agent (run scripts/train.py first, or drop '{name}')")
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    identity = {
        "space": name, "kind": "action" if trained else "control", "model": "lvaa_jax agent (instruction pathway)",
        "config_sha256": sha256_file(config_file),
        "checkpoint_step": steps[-1] if trained and steps else 0,
        "pooling": json.loads(config_file.read_text())["model"]["pooling"], "layers": "all",
    }

    def compute():
        agent = restore_agent(workdir, trained=trained)
        return agent.embed(instructions, all_layers=True), {"checkpoint": str(checkpoints), "step": agent.step}

    return Space(name, identity, compute)


def _model_space(name: str, spec: ml_collections.ConfigDict, instructions: list[str], embed) -> Space:
    from lvaa_jax.embeddings import hf

    identity = {"space": name, **hf.space_meta(hf.ModelSpec.parse(spec, name=name))}
    return Space(name, identity, lambda: hf.embed_with_model(
        hf.ModelSpec.parse(spec, name=name), instructions, batch_size=embed.batch_size, device=embed.device))


def build_spaces(config: ml_collections.ConfigDict, workdir: Path, instructions: list[str]) -> list[Space]:
    embed = config.embed
    unknown = sorted(set(embed.controls) - set(CONTROLS))
    if unknown:
        raise LvaaError(f"config.embed.controls: unknown control {unknown[0]!r}; known: {', '.join(CONTROLS)}")
    spaces = [_agent_space("action", workdir, instructions)]
    if "untrained_agent" in embed.controls:
        spaces.append(_agent_space("untrained_agent", workdir, instructions))
    if "bag_of_words" in embed.controls:
        spaces.append(Space("bag_of_words", {"space": "bag_of_words", "kind": "control"}, lambda: bag_of_words(instructions)))
    if "random" in embed.controls:
        identity = {"space": "random", "kind": "control", "dim": embed.random_dim, "seed": config.seed}
        spaces.append(Space("random", identity, lambda: random_gaussian(len(instructions), embed.random_dim, config.seed)))
    for name, spec in embed.models.items():
        if name in {s.name for s in spaces}:
            raise LvaaError(f"config.embed.models.{name}: the name is taken by a built-in space; rename it")
        spaces.append(_model_space(name, spec, instructions, embed))
    return spaces


def check_embed_settings(config: ml_collections.ConfigDict) -> None:
    check_section(config, "embed", batch_size=POSITIVE_INT, random_dim=POSITIVE_INT)


@holds_run_folder
def embed_instructions(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> dict[str, Path]:
    """Writes ``<workdir>/embeddings/<space>.npz`` for every space and ``instructions.json``; returns the tables.

    In a job of several processes, process 0 embeds (the language models run on its devices) and the
    others wait for the tables.
    """
    check_embed_settings(config)
    workdir = Path(workdir)
    tables = on_process_zero(lambda: {name: str(path) for name, path in _embed(config, workdir, progress).items()},
                             "the embedding tables")
    return {name: Path(path) for name, path in tables.items()}


def _embed(config: ml_collections.ConfigDict, workdir: Path, progress: bool) -> dict[str, Path]:
    out = workdir / "embeddings"
    out.mkdir(parents=True, exist_ok=True)
    instructions = instruction_set(config, workdir)
    flags = flag_instructions(instructions, workdir)
    write_json(out / "instructions.json", {**flags, "instructions": instructions})
    if flags["unseen_in_training"]:
        log.warning("%d of %d instructions never appear in the agent's training demos (listed in %s)",
                    len(flags["unseen_in_training"]), len(instructions), out / "instructions.json")
    spaces = build_spaces(config, workdir, instructions)
    tables = {}
    for space in progress_bar(spaces, desc="embedding spaces", unit="space", disable=not progress):
        path = out / f"{space.name}.npz"
        saved = read_meta(path)
        identity = {**space.identity, "instructions_sha256": flags["sha256"]}
        if saved is not None and all(saved.get(k) == v for k, v in identity.items()):
            log.info("%s: up to date, skipped", path)
        else:
            embeddings, meta = space.compute()
            date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            save_table(path, embeddings, instructions, {**meta, **identity, "date": date})
            log.info("%s: %s", path, "x".join(map(str, embeddings.shape)))
        tables[space.name] = path
    return tables
