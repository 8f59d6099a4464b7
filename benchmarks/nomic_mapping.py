"""Is nomic-embed-text mapped right? A check that shares none of the mapping's assumptions: its neighbours
against two other sentence encoders' on a study's instructions, beside a deliberately wrong mapping.

    python -m benchmarks.nomic_mapping --workdir=runs/default

Prints precision@k (last layers) of nomic-embed-text-v1.5 (as mapped by lvaa_jax.embeddings.nomic_gguf,
with and without its "clustering: " prefix, and with gate and up swapped in every layer) against the run's
all-MiniLM-L6-v2 and all-mpnet-base-v2 tables, and theirs against each other as the reference: a right
mapping agrees with them about as much as they agree with each other; a wrong one falls towards chance.
Needs the wide panel's nomic parts (python scripts/fetch_models.py --panel=offline_wide).
"""

import shutil
import tempfile
from pathlib import Path

from absl import app, flags

WORKDIR = flags.DEFINE_string("workdir", "runs/default", "A finished default study (its embeddings/ tables).")
K = flags.DEFINE_integer("k", 15, "Neighbours.")
REFERENCES = ("minilm_l6", "mpnet_base")


def swapped_gate_and_up(folder: Path, out: Path) -> Path:
    import safetensors.numpy

    shutil.copytree(folder, out)
    weights = safetensors.numpy.load_file(out / "model.safetensors")
    for name in [n for n in weights if n.endswith("mlp.gate_proj.weight")]:
        up = name.replace("gate_proj", "up_proj")
        weights[name], weights[up] = weights[up], weights[name]
    safetensors.numpy.save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv):
    from lvaa_jax.alignment import precision_at_k
    from lvaa_jax.embeddings import hf, load_table, sources

    tables = {name: load_table(Path(WORKDIR.value) / "embeddings" / f"{name}.npz") for name in REFERENCES}
    instructions = list(tables[REFERENCES[0]].instructions)
    references = {name: table.embeddings[-1] for name, table in tables.items()}
    folder = sources.join_parts("nomic-embed-text-v1.5-f16")
    print(f"{len(instructions)} instructions, k = {K.value}, chance {K.value / (len(instructions) - 1):.3f}")
    print(f"reference: {' ~ '.join(REFERENCES)} {precision_at_k(*references.values(), K.value):.3f}")
    with tempfile.TemporaryDirectory() as scratch:
        variants = [("as mapped, prefix 'clustering: '", folder, "clustering: "), ("as mapped, no prefix", folder, ""),
                    ("gate and up swapped (wrong)", swapped_gate_and_up(folder, Path(scratch) / "wrong"), "clustering: ")]
        for label, source, prefix in variants:
            spec = dict(source=str(source), kind="encoder", pooling="mean", layers="last", prefix=prefix)
            nomic, _ = hf.embed_with_model(spec, instructions, progress=False)
            scores = ", ".join(f"~ {name} {precision_at_k(nomic, x, K.value):.3f}" for name, x in references.items())
            print(f"nomic-embed-text {label}: {scores}")


if __name__ == "__main__":
    app.run(main)
