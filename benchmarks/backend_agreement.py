"""Whether the study's results depend on the embedding backend: two runs of one study that differ only in
``backend`` (JAX and PyTorch), compared table by table and in their headline precision@15.

    python scripts/embed.py --workdir=RUN_JAX                     # the default: jax for every panel model
    python scripts/embed.py --workdir=RUN_TORCH --config.embed.models.NAME.backend=torch ...
    python scripts/align.py --workdir=RUN_JAX; python scripts/align.py --workdir=RUN_TORCH
    python -m benchmarks.backend_agreement --a=RUN_JAX --b=RUN_TORCH

Per model: the backends recorded in each table, the largest difference of any layer relative to that layer's
RMS, and the neighbours each instruction gets (precision@15 of one table against the other, lowest over
layers: 1.000 is the same 15 neighbours everywhere, up to float near-ties). Then each headline pair with a
model (``alignment/headline.csv``), last and best layer, from both runs.
"""

from __future__ import annotations

import csv
from pathlib import Path

from absl import app, flags

from benchmarks.embed_throughput import knn_agreement, layer_error

flags.DEFINE_string("a", None, "A finished run folder (embeddings/ and alignment/), e.g. the JAX backend's.", required=True)
flags.DEFINE_string("b", None, "The same study run on the other backend.", required=True)


def headline(run: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(run / "alignment" / "headline.csv", newline="") as f:
        return {(row["a"], row["b"]): row for row in csv.DictReader(f)}


def main(_) -> None:
    from lvaa_jax.embeddings import load_table

    a, b = Path(flags.FLAGS.a), Path(flags.FLAGS.b)
    models = sorted(p.stem for p in (a / "embeddings").glob("*.npz")
                    if "backend" in load_table(p).meta and (b / "embeddings" / p.name).exists())
    print(f"a = {a}, b = {b}\n")
    print("| model | backends (a, b) | layers | max error / layer RMS | kNN@15 agreement (lowest layer) |")
    print("| --- | --- | --- | --- | --- |")
    for name in models:
        ta, tb = (load_table(run / "embeddings" / f"{name}.npz") for run in (a, b))
        print(f"| {name} | {ta.meta['backend']}, {tb.meta['backend']} | {ta.embeddings.shape[0]} | "
              f"{layer_error(ta.embeddings, tb.embeddings):.1e} | {knn_agreement(ta.embeddings, tb.embeddings):.3f} |")
    print("\n| pair | precision@15 last (a, b) | best (a, b) | best layers (a; b) |")
    print("| --- | --- | --- | --- |")
    rows_a, rows_b = headline(a), headline(b)
    for pair, ra in rows_a.items():
        if not set(pair) & set(models) or pair not in rows_b:
            continue
        rb = rows_b[pair]
        print(f"| {pair[0]} ~ {pair[1]} | {float(ra['precision_last']):.4f}, {float(rb['precision_last']):.4f} | "
              f"{float(ra['precision_best']):.4f}, {float(rb['precision_best']):.4f} | "
              f"{ra['layer_a_best']},{ra['layer_b_best']}; {rb['layer_a_best']},{rb['layer_b_best']} |")


if __name__ == "__main__":
    app.run(main)
