"""Every test runs on the CPU with 8 forced devices, so data parallelism is exercised everywhere."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny run, shared read-only by the test modules: demos, 20 training steps, checkpoints at 10 and 20.
    Returns (config, workdir, dataset, final evaluation); a test that alters it works on a copy."""
    from tiny_runs import tiny_config

    from lvaa_jax.agent import train_and_evaluate
    from lvaa_jax.babyai import make_demos

    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config()
    dataset = make_demos(config, workdir, progress=False)
    evaluation = train_and_evaluate(config, workdir, progress=False)
    return config, workdir, dataset, evaluation
