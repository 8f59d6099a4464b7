"""The tiny trained run folder several test modules share (conftest.py builds it once per session)."""

from configs.default import get_config


def tiny_config(**train):
    """configs/default.py:tiny with fewer demos and evaluation episodes, workers inline."""
    config = get_config("tiny")
    config.data.num_workers = 0
    config.data.episodes_per_level = 24
    config.eval.episodes_per_level = 2
    config.train.update(train)
    return config
