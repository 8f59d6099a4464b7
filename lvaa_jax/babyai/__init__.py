"""Stage 1: BabyAI expert demos, their on-disk format, the instruction tokenizer and the batch iterator."""

from lvaa_jax.babyai.batches import WindowBatches
from lvaa_jax.babyai.dataset import FORMAT_VERSION, DemoDataset, load_demos
from lvaa_jax.babyai.generate import make_demos, summary_table
from lvaa_jax.babyai.levels import check_levels, episode_seed, known_levels, make_env
from lvaa_jax.babyai.tokenizer import Tokenizer

__all__ = [
    "FORMAT_VERSION", "DemoDataset", "Tokenizer", "WindowBatches", "check_levels", "episode_seed", "known_levels",
    "load_demos", "make_demos", "make_env", "summary_table",
]
