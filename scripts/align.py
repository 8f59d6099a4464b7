"""Stage 4: score the alignment of every pair of embedding spaces; writes matrices, report.md and heatmaps.

    python scripts/align.py --embeddings=runs/default/embeddings --k=15 --out=runs/default/alignment
    python scripts/align.py --workdir=runs/default   # the same folders, from the run folder
    python scripts/align.py --distributed ...        # one of several processes: docs/distributed.md

Every other setting is the ``align`` section of --config (``--config.align.permutations=1000``).
"""

import contextlib
from pathlib import Path

from absl import flags

from lvaa_jax import cli

CONFIG, WORKDIR = cli.define_config_flags()
EMBEDDINGS = flags.DEFINE_string("embeddings", None, "Folder of <space>.npz tables (default: <workdir>/embeddings).")
OUT = flags.DEFINE_string("out", None, "Output folder (default: <workdir>/alignment).")
K = flags.DEFINE_integer("k", None, "Neighbours per instruction for precision@k (default: the config's align.k).")
DISTRIBUTED = cli.DistributedFlags()


def main(argv):
    DISTRIBUTED.initialize()
    from lvaa_jax.alignment import align_folder
    from lvaa_jax.alignment.training_curve import alignment_over_training
    from lvaa_jax.distributed import is_primary, on_process_zero
    from lvaa_jax.runlock import hold_run_folder

    config, workdir = cli.resolve(CONFIG, WORKDIR)
    if K.value is not None:
        config.align.k = K.value
    out = Path(OUT.value or workdir / "alignment")
    # Writing into the run folder: hold it, as every stage does (an --out elsewhere leaves it free).
    writes_workdir = out.resolve().is_relative_to(workdir.resolve())
    with hold_run_folder(workdir) if writes_workdir else contextlib.nullcontext():
        # Reading the run folder's own tables, also score its snapshots of training (if it has any).
        sections = {} if EMBEDDINGS.value else on_process_zero(
            lambda: alignment_over_training(workdir, config.align, out), "the alignment over training")
        summary = align_folder(EMBEDDINGS.value or workdir / "embeddings", config.align, out, sections)
    if not is_primary():
        return
    print(f"N = {summary['n']} instructions, k = {summary['k']}, chance {summary['chance']:.4f}")
    for pair in summary["pairs"]:
        last, best = pair["last"], pair["best"]
        print(f"{pair['a']:>20s} ~ {pair['b']:<20s} precision@k {last['precision']:.3f} "
              f"(calibrated {last['calibrated']:+.3f}, p {last['p_value']:.3g}); best layers "
              f"{best['layers'][0]}/{best['layers'][1]}: {best['precision']:.3f}")
    for family in summary["baseline"]:
        if family["layers"] == "last":
            print(family["sentence"])
    print(f"report: {out}/report.md")


if __name__ == "__main__":
    cli.run(main)
