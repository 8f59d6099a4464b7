"""Stage 3: embed the instruction set in every space of the panel into <workdir>/embeddings.

    python scripts/embed.py --config=configs/default.py --workdir=runs/default
"""

from lvaa_jax import cli

CONFIG, WORKDIR = cli.define_config_flags()


def main(argv):
    from lvaa_jax.embeddings import embed_instructions, load_table

    config, workdir = cli.resolve(CONFIG, WORKDIR)
    for name, path in embed_instructions(config, workdir).items():
        print(f"{name:20s} {'x'.join(map(str, load_table(path).embeddings.shape)):>14s}  {path}")


if __name__ == "__main__":
    cli.run(main)
