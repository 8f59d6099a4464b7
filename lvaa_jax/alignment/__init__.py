"""Stage 4: how alike are embedding spaces of the same instructions? precision@k (mutual kNN overlap) and its
companions, the Platonic Representation Hypothesis metric family, with permutation calibration, bootstrap
intervals, k sweeps and per-layer curves."""

from lvaa_jax.alignment.knn import (
    knn_indices,
    nearest_neighbours,
    precision_at_k,
    precision_matrix,
    precision_sweep,
)
from lvaa_jax.alignment.knn_family import cknna, cycle_knn, edit_distance_knn, lcs_knn
from lvaa_jax.alignment.similarity import linear_cka, procrustes_similarity, rsa, svcca
from lvaa_jax.alignment.spaces import clamp_outliers
from lvaa_jax.alignment.stage import align_folder, align_tables
from lvaa_jax.alignment.stats import bootstrap_means, permutation_null, precision_interval, precision_null

__all__ = [
    "align_folder",
    "align_tables",
    "bootstrap_means",
    "clamp_outliers",
    "cknna",
    "cycle_knn",
    "edit_distance_knn",
    "knn_indices",
    "lcs_knn",
    "linear_cka",
    "nearest_neighbours",
    "permutation_null",
    "precision_at_k",
    "precision_interval",
    "precision_matrix",
    "precision_null",
    "precision_sweep",
    "procrustes_similarity",
    "rsa",
    "svcca",
]
