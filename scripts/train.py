"""Stage 2: train the agent by behavioral cloning on <workdir>/demos, then evaluate it closed-loop.

    python scripts/train.py --config=configs/default.py --workdir=runs/default
    python scripts/train.py --distributed ...   # one of several processes: docs/distributed.md
"""

from lvaa_jax import cli

CONFIG, WORKDIR = cli.define_config_flags()
DISTRIBUTED = cli.DistributedFlags()


def main(argv):
    DISTRIBUTED.initialize()
    from lvaa_jax.agent import train_and_evaluate
    from lvaa_jax.distributed import is_primary

    config, workdir = cli.resolve(CONFIG, WORKDIR)
    evaluation = train_and_evaluate(config, workdir)
    if is_primary():
        for level, r in evaluation["levels"].items():
            print(f"{level:32s} success {r['success_rate']:.3f}  mean length {r['mean_length']:.1f}")
        print(f"mean success rate {evaluation['mean_success_rate']:.3f}")


if __name__ == "__main__":
    cli.run(main)
