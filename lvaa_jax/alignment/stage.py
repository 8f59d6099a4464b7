"""Stage 4: how alike are the embedding spaces? ``align_tables`` scores every pair and writes the report.

Order of work, each step reusing the previous one's arrays:
1. kNN lists once per (space, layer), at the largest k any score needs plus one (the k sweep takes
   prefixes; the extra neighbour shows ties at the k-th). Constant layers before the last are left out.
2. Overlaps for every layer pair of every two spaces (one batched kernel): per-layer curves, last-layer and
   best-layer-pair scores.
3. Permutation null of every layer pair by relabelling the index sets; the best-pair score is calibrated
   against the null of the same maximum over layer pairs (max-over-layers inflates raw scores).
4. Bootstrap intervals from per-instruction overlaps; the k sweep; at the last layers, the Platonic
   Representation Hypothesis kNN metrics from the same lists (with their nulls), and Procrustes, CKA, RSA
   and SVCCA.
5. The language-model baseline (``baseline.py``) from the last- and best-layer scores and the same
   bootstrap draws; each space's kind (from its table's metadata) and mean pairwise cosine.

``align.center`` subtracts each space's mean vector (per layer) before step 1, so every cosine sees centred
spaces.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lvaa_jax.alignment import report
from lvaa_jax.alignment.baseline import language_model_baseline, space_kind
from lvaa_jax.alignment.knn import (
    nearest_neighbours,
    overlap_counts,
    overlap_totals,
    sweep_totals,
    symmetric,
    upper_pairs,
)
from lvaa_jax.alignment.knn_family import family_matrices
from lvaa_jax.alignment.similarity import MIN_N_UNBIASED, similarity_matrices
from lvaa_jax.alignment.spaces import (
    centre,
    check_k,
    check_space,
    clamp_outliers,
    mean_cosine,
    one_direction,
    unit_rows,
)
from lvaa_jax.alignment.stats import (
    bootstrap_means,
    map_chunks,
    p_values,
    percentile_interval,
    permutation_null,
)
from lvaa_jax.config_checks import BOOLEAN, NON_NEGATIVE_INT, POSITIVE_INT, check_values
from lvaa_jax.distributed import on_process_zero
from lvaa_jax.embeddings.table import EmbeddingTable, load_table
from lvaa_jax.errors import LvaaError
from lvaa_jax.progress import progress_bar

log = logging.getLogger(__name__)

CI_LEVEL = 0.95
_LAYER_PAIR_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``align`` config section, validated against the number of instructions N."""

    k: int
    sweep: tuple[int, ...]  # the k values below N; larger ones are listed in ``sweep_skipped``
    sweep_skipped: tuple[int, ...]
    permutations: int
    bootstrap: int
    center: bool
    clamp_outliers: bool
    block_size: int | None
    rsa_max_n: int
    seed: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, n: int) -> Settings:
        check_values(config, "config.align.", permutations=POSITIVE_INT, bootstrap=POSITIVE_INT, center=BOOLEAN,
                     clamp_outliers=BOOLEAN, block_size=NON_NEGATIVE_INT, rsa_max_n=POSITIVE_INT,
                     seed=NON_NEGATIVE_INT)
        for k in config.k_sweep:
            check_values({"k_sweep": k}, "config.align.", k_sweep=POSITIVE_INT)
        sweep = sorted(set(config.k_sweep))
        return cls(
            k=check_k(config.k, n, "config.align.k"),
            sweep=tuple(k for k in sweep if k < n),
            sweep_skipped=tuple(k for k in sweep if k >= n),
            permutations=config.permutations,
            bootstrap=config.bootstrap,
            center=config.center,
            clamp_outliers=config.clamp_outliers,
            block_size=config.block_size or None,
            rsa_max_n=max(4, config.rsa_max_n),
            seed=config.seed,
        )

    def prepare(self, x, label: str) -> jax.Array:
        """A space as every score sees it, checked (``check_space``, naming ``label``): centred (``center``),
        then clamped (``clamp_outliers``)."""
        x = check_space(x, label)
        if self.center:
            x = check_space(centre(x), f"{label} after centring (config.align.center)")
        return clamp_outliers(x) if self.clamp_outliers else x


@dataclasses.dataclass(frozen=True)
class LayerPairs:
    """Every scored layer pair. Spaces a < b: all pairs of their searched layers; a space with itself: its
    last layer only (any layer matches itself perfectly). Rows of one space pair are contiguous."""

    rows: np.ndarray  # int32[Q, 2]: rows of the [T, N, K] stack of (space, searched layer) index sets
    layers: np.ndarray  # int32[Q, 2]: the layer within each space
    start: np.ndarray  # int[P]: first row of each space pair
    last: np.ndarray  # int[P]: row of each space pair's last-layer pair

    @classmethod
    def build(cls, searched: Sequence[np.ndarray], space_pairs: np.ndarray) -> LayerPairs:
        """``searched[s]``: the layers of space s in the stack, in order, its last layer last."""
        offset = np.cumsum([0, *map(len, searched)])[:-1]
        rows, layers, start, last = [], [], [], []
        size = 0
        for a, b in space_pairs:
            top = (len(searched[a]) - 1, len(searched[b]) - 1)
            grid = np.asarray([top]) if a == b else np.argwhere(np.ones(np.add(top, 1), bool))
            start.append(size)
            last.append(size + len(grid) - 1)  # argwhere lists the grid row-major: (top) comes last
            rows.append(grid + offset[[a, b]])
            layers.append(np.stack([searched[a][grid[:, 0]], searched[b][grid[:, 1]]], 1))
            size += len(grid)
        return cls(np.concatenate(rows).astype(np.int32), np.concatenate(layers).astype(np.int32),
                   np.asarray(start), np.asarray(last))


def align_folder(embeddings_dir: str | Path, config: ml_collections.ConfigDict, out_dir: str | Path,
                 extra_sections: Mapping[str, str] | None = None) -> dict:
    """``align_tables`` on every ``*.npz`` table in ``embeddings_dir``, named by file stem, in name order."""
    embeddings_dir = Path(embeddings_dir)
    if not embeddings_dir.is_dir():
        raise LvaaError(f"{embeddings_dir}: no such folder of embedding tables")
    paths = sorted(embeddings_dir.glob("*.npz"))
    if not paths:
        raise LvaaError(f"{embeddings_dir}: no embedding tables (*.npz) in this folder")
    return align_tables({p.stem: load_table(p) for p in paths}, config, Path(out_dir), extra_sections)


def align_tables(tables: Mapping[str, EmbeddingTable], config: ml_collections.ConfigDict, out_dir: Path,
                 extra_sections: Mapping[str, str] | None = None) -> dict:
    """Scores every pair of spaces and writes matrices, k sweep, layer curves, heatmaps, ``report.md`` (with
    ``extra_sections``, heading -> Markdown, appended in order) and ``summary.json`` to ``out_dir``.

    ``config`` is the ``align`` section of the study config. Returns the summary (headline numbers).
    """
    if len(tables) < 2:
        raise LvaaError(f"need at least two embedding tables to compare, got {len(tables)}")
    names = tuple(tables)
    n = _check_instructions(tables)
    if n < MIN_N_UNBIASED:
        raise LvaaError(f"{n} instructions: the alignment stage needs at least {MIN_N_UNBIASED} (debiased CKA and "
                        "CKNNA divide by N (N - 3))")
    s = Settings.from_config(config, n)
    out_dir = Path(out_dir)
    on_process_zero(lambda: out_dir.mkdir(parents=True, exist_ok=True), "the alignment folder")  # fail early
    num_layers = [tables[name].num_layers for name in names]
    key = jax.random.key(s.seed)

    def space(name: str, layer: int) -> tuple[jax.Array | None, str]:
        label = name if tables[name].num_layers == 1 else f"{name} (layer {layer % tables[name].num_layers})"
        x = jnp.asarray(tables[name].layer(layer), jnp.float32)
        last = layer % tables[name].num_layers == tables[name].num_layers - 1
        if not last and x.ndim == 2 and len(x) > 1 and _constant(x):
            return None, label  # a constant layer before the last: left out (``skipped``)
        return s.prepare(x, label), label

    # One search per (space, layer), one neighbour past the largest k so that ties at the k-th are visible.
    big_k = max(s.k, *s.sweep)
    search_k = min(big_k + 1, n - 1)
    searched, skipped, found = [], [], []
    for name, count in zip(names, num_layers, strict=True):
        kept = []
        for layer in progress_bar(range(count), desc=f"neighbours of {name}", leave=False):
            x, label = space(name, layer)
            if x is None:
                skipped.append({"space": name, "layer": layer})
                continue
            kept.append(layer)
            found.append(nearest_neighbours(x, search_k, block_size=s.block_size, name=label))
        searched.append(np.asarray(kept))
    similarities = jnp.stack([v for v, _ in found])
    indices = jnp.stack([i for _, i in found])[..., :big_k]
    head = indices[..., : s.k]

    space_pairs = upper_pairs(len(names))
    lp = LayerPairs.build(searched, space_pairs)
    rows = jnp.asarray(lp.rows)
    raw = map_chunks(lambda ids: overlap_totals(head, head, rows[jnp.minimum(ids, len(rows) - 1)]),
                     len(rows), min(_LAYER_PAIR_CHUNK, len(rows)), "layer pairs")
    best = lp.start + np.asarray([segment.argmax() for segment in np.split(raw, lp.start[1:])])
    null = permutation_null(head, lp.rows, jax.random.fold_in(key, 0), s.permutations)
    counts = overlap_counts(head, head, rows[np.concatenate([lp.last, best])])
    boot = bootstrap_means(counts, jax.random.fold_in(key, 1), s.bootstrap) / s.k
    ci_low, ci_high = percentile_interval(boot, CI_LEVEL)
    sweep = np.asarray(sweep_totals(indices, rows[lp.last], s.sweep)) / (n * np.asarray(s.sweep))

    scale = n * s.k
    scores = {}
    for which, chosen, nulls in (("last", lp.last, null[:, lp.last]),
                                 ("best", best, np.maximum.reduceat(null, lp.start, axis=1))):
        mean = nulls.mean(0) / scale
        scores[which] = dict(layers=lp.layers[chosen], precision=raw[chosen] / scale, null_mean=mean,
                             calibrated=raw[chosen] / scale - mean, p_value=p_values(raw[chosen], nulls))
    p = len(space_pairs)
    scores["last"].update(ci_low=ci_low[:p], ci_high=ci_high[:p])
    scores["best"].update(ci_low=ci_low[p:], ci_high=ci_high[p:])

    last_rows = np.cumsum([len(kept) for kept in searched]) - 1
    family, undefined = family_matrices(head, similarities[..., : s.k], last_rows, jax.random.fold_in(key, 0),
                                        s.permutations)
    values = np.asarray(similarities[last_rows])
    ties = (values[..., s.k - 1] == values[..., s.k]).mean(1) if search_k > s.k else np.zeros(len(names))

    last_spaces = [unit_rows(space(name, -1)[0]) for name in names]
    rsa_rows = _rsa_rows(n, s.rsa_max_n, jax.random.fold_in(key, 2))
    companions, companions_undefined = similarity_matrices(last_spaces, [x[rsa_rows] for x in last_spaces])
    undefined |= companions_undefined

    kinds = [space_kind(tables[name].meta) for name in names]
    baseline = language_model_baseline(names, kinds, space_pairs, scores, {"last": boot[:, :p], "best": boot[:, p:]},
                                       CI_LEVEL)
    summary = _summary(names, tables, kinds, n, s, space_pairs, scores, rsa_rows.size, skipped, ties, undefined,
                       baseline["families"])

    def write() -> dict:  # process 0 alone (every process scored the lists it got back)
        _write(out_dir, summary, names, s, space_pairs, scores, companions | family, lp, raw, sweep, num_layers,
               baseline["records"], extra_sections or {})
        return summary

    return on_process_zero(write, f"the alignment files in {out_dir}")


def _constant(x: jax.Array) -> bool:
    """A finite layer without zero rows whose rows all point the same way (e.g. the first-token state at a
    model's input layer, the same for every instruction)."""
    return bool(jnp.isfinite(x).all()) and bool((jnp.linalg.norm(x, axis=1) > 0).all()) and one_direction(x)


def _check_instructions(tables: Mapping[str, EmbeddingTable]) -> int:
    """N, after checking every table lists the first table's instructions in the same order."""
    (first, reference), *rest = tables.items()
    want = reference.instructions
    for name, table in rest:
        got = table.instructions
        if got == want:
            continue
        if len(got) != len(want):
            raise LvaaError(f"{name}: {len(got)} instructions, but {first} has {len(want)}; every table must "
                            "embed the same instruction list")
        if sorted(got) == sorted(want):
            i = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
            raise LvaaError(f"{name}: same instructions as {first} in a different order (row {i}: {got[i]!r} "
                            f"vs {want[i]!r}); every table must list them in the canonical order")
        present = set(got)
        missing = next(w for w in want if w not in present)
        raise LvaaError(f"{name}: instruction list differs from {first}'s ({missing!r} is missing)")
    return len(want)


def _rsa_rows(n: int, limit: int, key: jax.Array) -> np.ndarray:
    """The instructions RSA is computed on: all, or a fixed random subset of ``limit`` (it needs N^2 memory)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.asarray(jax.random.choice(key, n, (limit,), replace=False)))


def _summary(names: tuple[str, ...], tables: Mapping[str, EmbeddingTable], kinds: Sequence[str], n: int,
             s: Settings, space_pairs: np.ndarray, scores: dict[str, dict[str, np.ndarray]], rsa_n: int,
             skipped: list[dict], ties: np.ndarray, undefined: Mapping[str, Mapping[int, str]],
             baseline: list[dict]) -> dict:
    """The headline numbers of every pair of distinct spaces, with the settings (summary.json): also each
    space's kind and mean pairwise cosine at its last layer (as stored, before centring), the layers left
    out of the search (every instruction had the same vector there), each space's fraction of instructions
    whose k-th and (k+1)-th neighbours tie at the last layer, the metrics undefined for a space, with why,
    and the language-model baseline (``baseline.py``)."""
    pairs = []
    for p, (a, b) in enumerate(space_pairs):
        if a == b:
            continue
        entry = {"a": names[a], "b": names[b]}
        for which, values in scores.items():
            entry[which] = {key: v[p].tolist() if key == "layers" else float(v[p]) for key, v in values.items()}
        pairs.append(entry)
    return {
        "n": n,
        "k": s.k,
        "chance": s.k / (n - 1),
        "spaces": [{"name": name, "kind": kind, "layers": tables[name].num_layers,
                    "width": tables[name].embeddings.shape[-1], "mean_cosine": mean_cosine(tables[name].layer(-1)),
                    "ties_at_k": float(tie), "meta": tables[name].meta}
                   for name, kind, tie in zip(names, kinds, ties, strict=True)],
        "settings": dataclasses.asdict(s) | {"ci_level": CI_LEVEL, "rsa_instructions": rsa_n},
        "pairs": pairs,
        "skipped_layers": skipped,
        "undefined": [{"metric": metric, "space": names[a], "reason": reason}
                      for metric, spaces in undefined.items() for a, reason in spaces.items()],
        "baseline": baseline,
    }


def _write(out_dir: Path, summary: dict, names: tuple[str, ...], s: Settings, space_pairs: np.ndarray,
           scores: dict[str, dict[str, np.ndarray]], similarities: dict[str, np.ndarray], lp: LayerPairs,
           raw: np.ndarray, sweep: np.ndarray, num_layers: list[int], baseline: list[dict],
           extra_sections: Mapping[str, str]) -> None:
    """Every output file: matrices, records, figures, report.md and summary.json."""
    m, n, k = len(names), summary["n"], s.k
    common = {"n": n, "k": k, "chance": summary["chance"], "center": s.center, "clamp_outliers": s.clamp_outliers}
    matrices = dict(similarities)
    for which, suffix in (("last", ""), ("best", "_best_layers")):
        values = scores[which]
        layers = np.zeros((m, m, 2), np.int32)  # [a, b] = (layer of a, layer of b)
        layers[space_pairs[:, 0], space_pairs[:, 1]] = values["layers"]
        layers[space_pairs[:, 1], space_pairs[:, 0]] = values["layers"][:, ::-1]
        for key, metric in (("precision", "precision_at_k"), ("calibrated", "precision_calibrated"),
                            ("p_value", "precision_p_value"), ("null_mean", "precision_null_mean"),
                            ("ci_low", "precision_ci_low"), ("ci_high", "precision_ci_high")):
            matrices[metric + suffix] = symmetric(m, space_pairs, values[key])
            report.write_matrix(out_dir, metric + suffix, names, matrices[metric + suffix], **common,
                                layers=layers)
    for metric in similarities:
        report.write_matrix(out_dir, metric, names, matrices[metric], **common)
    for metric, title in report.TITLES.items():
        report.heatmap(out_dir / f"{metric}.png", names, matrices[metric], title.format(k=k))

    off = space_pairs[:, 0] != space_pairs[:, 1]
    sweep_records = [{"a": names[a], "b": names[b], "k": kk, "n": n, "precision": float(sweep[p, j]),
                      "chance": kk / (n - 1)}
                     for p, (a, b) in enumerate(space_pairs) if off[p] for j, kk in enumerate(s.sweep)]
    report.write_records(out_dir, "k_sweep", sweep_records, n=n, skipped_k=list(s.sweep_skipped))

    owner = np.repeat(np.arange(len(space_pairs)), np.diff([*lp.start, len(raw)]))
    layer_records = [{"a": names[space_pairs[o, 0]], "layer_a": int(la), "b": names[space_pairs[o, 1]],
                      "layer_b": int(lb), "precision": float(v / (n * k))}
                     for o, (la, lb), v in zip(owner, lp.layers, raw, strict=True) if off[o]]
    report.write_records(out_dir, "layers", layer_records, **common,
                         num_layers=dict(zip(names, num_layers, strict=True)))
    precision_of = {}
    for r in layer_records:
        precision_of[r["a"], r["layer_a"], r["b"], r["layer_b"]] = r["precision"]
        precision_of[r["b"], r["layer_b"], r["a"], r["layer_a"]] = r["precision"]
    for name, count in zip(names, num_layers, strict=True):
        if count > 1:
            curves = {other: [precision_of.get((name, layer, other, last - 1), np.nan) for layer in range(count)]
                      for other, last in zip(names, num_layers, strict=True) if other != name}
            report.layer_curves(out_dir / f"layers_{name}.png", name, curves, summary["chance"], k)

    report.write_records(out_dir, "headline", [_flat(entry) for entry in summary["pairs"]], **common)
    report.write_records(out_dir, "baseline", baseline, **common, ci_level=CI_LEVEL, families=summary["baseline"])
    (out_dir / "report.md").write_text(report.render(summary, matrices, sweep_records, baseline, extra_sections))
    report.write_json(out_dir / "summary.json", summary)
    log.info("alignment of %d spaces over %d instructions written to %s", m, n, out_dir)


def _flat(entry: dict) -> dict:
    """One headline pair as a flat CSV row."""
    row = {"a": entry["a"], "b": entry["b"]}
    for which in ("last", "best"):
        values = entry[which]
        row[f"layer_a_{which}"], row[f"layer_b_{which}"] = values["layers"]
        row.update({f"{key}_{which}": v for key, v in values.items() if key != "layers"})
    return row
