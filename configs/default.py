"""Default study: four BabyAI instruction families, sized for minutes on 2 CPU cores.

Variants: ``configs/default.py`` (the default study) and ``configs/default.py:tiny`` (seconds; tests and
smoke runs). Override anything on the command line: ``--config.train.steps=200``.
"""

import importlib.util
from pathlib import Path

import ml_collections

DEFAULT_LEVELS = (
    "BabyAI-GoToLocal-v0",  # go to
    "BabyAI-PickupLoc-v0",  # pick up
    "BabyAI-OpenDoorColor-v0",  # open
    "BabyAI-PutNextLocal-v0",  # put next
)


def model_panel(name: str) -> ml_collections.ConfigDict:
    """A panel from configs/models.py beside this file (config files are code, not a package)."""
    spec = importlib.util.spec_from_file_location("lvaa_model_panels", Path(__file__).with_name("models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "default"
    c.seed = 0

    # Stage 1: pre-rolled expert demos.
    c.data = ml_collections.ConfigDict()
    c.data.levels = DEFAULT_LEVELS
    c.data.episodes_per_level = 2500
    c.data.episodes_per_shard = 500
    c.data.num_workers = 2
    c.data.census_resets = 20000  # extra resets per level to list every mission of the level

    # Stage 2: the agent and its behavioral cloning.
    c.model = ml_collections.ConfigDict()
    c.model.width = 128
    c.model.cell_width = 32  # per grid cell: the 49 cells of each step dominate the compute
    c.model.num_heads = 4
    c.model.instruction_layers = 2
    c.model.memory_layers = 2
    c.model.mlp_ratio = 4
    c.model.context = 16  # steps of memory the agent attends over
    c.model.pooling = "mean"  # instruction embedding pooling: mean | max | first
    c.model.dropout = 0.0
    c.model.dtype = "float32"  # activations; bfloat16 for GPU/TPU (params stay float32)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 3000
    c.train.batch_size = 32  # rows of `context` steps per step, split over all devices
    c.train.windows_per_row = 2  # windows packed end to end in a row: 90% real steps instead of 47%
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.weight_decay = 1e-4
    c.train.grad_clip = 1.0
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    # The action space at step 0, every this many steps and at the end (alignment over training; 0: off).
    # A tenth of train.steps, following it (also in variants and overrides) unless set itself: an 11-point
    # curve whatever the length of training (checkpoints, every 500 steps, would give 7 here).
    c.train.snapshot_every = c.train.get_ref("steps") // 10
    c.train.eval_every = 0  # 0: evaluate at the end only

    c.eval = ml_collections.ConfigDict()
    c.eval.episodes_per_level = 100
    c.eval.max_steps = 0  # 0: each level's own step limit

    # Stage 3: embedding spaces.
    c.embed = ml_collections.ConfigDict()
    c.embed.instructions = ""  # "": every mission of the configured levels; else a file, one per line
    c.embed.models = model_panel("offline")
    c.embed.batch_size = 64
    c.embed.device = "auto"  # auto | cpu | cuda
    c.embed.controls = ("untrained_agent", "bag_of_words", "random")
    c.embed.random_dim = 128

    # Stage 4: alignment.
    c.align = ml_collections.ConfigDict()
    c.align.k = 15
    c.align.k_sweep = (1, 2, 5, 10, 15, 20, 30, 50)
    c.align.permutations = 200
    c.align.bootstrap = 200
    c.align.center = False  # subtract each space's mean vector before cosine (decoder states share a direction)
    c.align.clamp_outliers = False  # clamp at the 95th percentile of |x| (Platonic Representation code)
    c.align.block_size = 0  # 0: chosen from N and the device
    c.align.rsa_max_n = 5000  # RSA needs N^2 memory: above this, a fixed random subset of instructions
    c.align.seed = 0  # permutations, bootstrap resamples and the RSA subset

    if variant == "tiny":
        c.name = "tiny"
        c.data.levels = ("BabyAI-GoToLocal-v0",)
        c.data.episodes_per_level = 40
        c.data.episodes_per_shard = 20
        c.data.num_workers = 1
        c.data.census_resets = 200
        c.model.width = 32
        c.model.cell_width = 16
        c.model.num_heads = 2
        c.model.instruction_layers = 1
        c.model.memory_layers = 1
        c.model.context = 8
        c.train.steps = 20
        c.train.batch_size = 8
        c.train.warmup_steps = 5
        c.train.log_every = 5
        c.train.checkpoint_every = 10
        c.train.snapshot_every = 10
        c.eval.episodes_per_level = 4
        c.embed.models = ml_collections.ConfigDict()
        c.align.permutations = 20
        c.align.bootstrap = 20
        c.align.k = 5
        c.align.k_sweep = (1, 5, 10)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/default.py; known: tiny")
    return c
