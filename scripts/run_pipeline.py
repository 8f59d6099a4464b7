"""The whole study: demos, agent, embeddings, alignment report. Re-running skips finished stages.

    python scripts/run_pipeline.py                              # default study, CPU, ~8 minutes
    python scripts/run_pipeline.py --config=configs/paper.py    # paper scale, GPU/TPU host
    python scripts/run_pipeline.py --distributed ...            # one of several processes: docs/distributed.md
"""

from lvaa_jax import cli

CONFIG, WORKDIR = cli.define_config_flags()
DISTRIBUTED = cli.DistributedFlags()


def main(argv):
    DISTRIBUTED.initialize()
    from lvaa_jax.alignment.training_curve import console_table
    from lvaa_jax.distributed import is_primary
    from lvaa_jax.pipeline import headline, run_pipeline

    config, workdir = cli.resolve(CONFIG, WORKDIR)
    report = run_pipeline(config, workdir)
    if is_primary():
        print(f"\nreport: {report}\n{headline(report.parent)}")
        curve = console_table(report.parent)
        if curve:
            print(f"\n{curve}")


if __name__ == "__main__":
    cli.run(main)
