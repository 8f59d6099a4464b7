"""The whole study: demos, agent, embeddings, alignment report. Re-running skips finished stages.

    python scripts/run_pipeline.py                              # default study, CPU, ~8 minutes
    python scripts/run_pipeline.py --config=configs/paper.py    # paper scale, GPU/TPU host
"""

from lvaa_jax import cli

CONFIG, WORKDIR = cli.define_config_flags()
DISTRIBUTED = cli.define_distributed_flag()


def main(argv):
    cli.initialize_distributed(DISTRIBUTED)
    from lvaa_jax.alignment.training_curve import console_table
    from lvaa_jax.pipeline import headline, run_pipeline

    config, workdir = cli.resolve(CONFIG, WORKDIR)
    report = run_pipeline(config, workdir)
    print(f"\nreport: {report}\n{headline(report.parent)}")
    curve = console_table(report.parent)
    if curve:
        print(f"\n{curve}")


if __name__ == "__main__":
    cli.run(main)
