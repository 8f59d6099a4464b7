"""Stage 1: pre-roll BabyAI expert demos into <workdir>/demos.

    python scripts/make_demos.py --config=configs/default.py --workdir=runs/default
"""

from lvaa_jax import cli

CONFIG, WORKDIR = cli.define_config_flags()


def main(argv):
    from lvaa_jax.babyai import make_demos, summary_table

    config, workdir = cli.resolve(CONFIG, WORKDIR)
    print(summary_table(make_demos(config, workdir)))


if __name__ == "__main__":
    cli.run(main)
