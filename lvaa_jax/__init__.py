"""lvaa_jax: do language, vision and action representations converge? (Milano & Nolfi, 2026).

Stages: ``babyai`` (pre-rolled expert demos), ``agent`` (Flax BC agent), ``embeddings`` (one table per
space), ``alignment`` (precision@k and companions), ``pipeline`` (all four). Submodules are imported
on demand so that, e.g., scoring embeddings never imports minigrid and the core never imports torch.
"""

__version__ = "0.1.0"
