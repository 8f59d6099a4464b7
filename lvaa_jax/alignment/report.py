"""Files the alignment stage writes: matrices and records as CSV + JSON, heatmaps, layer curves, report.md.

Figures use matplotlib's object API (``Figure``), never pyplot, so nothing depends on a display or on global
backend state.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _plain(value):
    """JSON-safe: numpy scalars and arrays as Python values, non-finite floats as null."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, payload: Mapping) -> None:
    path.write_text(json.dumps(_plain(dict(payload)), indent=1, allow_nan=False) + "\n")


def write_matrix(out_dir: Path, metric: str, names: Sequence[str], matrix: np.ndarray, **extra) -> None:
    """``<metric>.csv`` (first column and header: space names) and ``<metric>.json`` (names, matrix, extra)."""
    with open(out_dir / f"{metric}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["space", *names])
        for name, row in zip(names, np.asarray(matrix), strict=True):
            writer.writerow([name, *(_number(v, ".6g") for v in row)])
    write_json(out_dir / f"{metric}.json", {"metric": metric, "names": list(names), "matrix": matrix, **extra})


def write_records(out_dir: Path, stem: str, records: Sequence[Mapping], **extra) -> None:
    """``<stem>.csv`` (one row per record, flat values) and ``<stem>.json`` ({"records": [...], **extra})."""
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else [])
        writer.writeheader()
        writer.writerows(records)
    write_json(out_dir / f"{stem}.json", {"records": list(records), **extra})


def heatmap(path: Path, names: Sequence[str], matrix: np.ndarray, title: str) -> None:
    """An annotated M x M heatmap; the colour scale is fixed to [0, 1] when every value lies in it. Labels and
    values shrink as M grows, so that a panel of 10-20 spaces stays readable."""
    matrix = np.asarray(matrix, dtype=float)
    finite = matrix[np.isfinite(matrix)]
    unit = finite.size and finite.min() >= 0 and finite.max() <= 1
    m = len(names)
    size = 1.6 + 0.7 * m
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="viridis", vmin=0 if unit else None, vmax=1 if unit else None)
    label_size = 9 if m <= 10 else 7
    ax.set_xticks(range(m), names, rotation=45, ha="right", fontsize=label_size)
    ax.set_yticks(range(m), names, fontsize=label_size)
    if m <= 20:
        middle = np.nanmean(finite) if finite.size else 0
        for (i, j), v in np.ndenumerate(matrix):
            colour = "black" if v > middle else "white"
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8 if m <= 10 else 6, color=colour)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=120)


def layer_curves(path: Path, space: str, curves: Mapping[str, Sequence[float]], chance: float, k: int) -> None:
    """precision@k of every layer of ``space`` against each other space (at that space's last layer). Layers
    are integers, so are the ticks; with many spaces the legend goes beside the axes in two columns."""
    many = len(curves) > 8
    fig = Figure(figsize=(8.4 if many else 6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab20" if len(curves) > 10 else "tab10"].colors
    for colour, (other, values) in zip(itertools.cycle(colours), curves.items()):
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=other, color=colour)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance k/(N-1)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"layer of {space} (0: input embeddings)")
    ax.set_ylabel(f"precision@{k}")
    ax.set_title(f"{space}: alignment by layer")
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncols=2 if len(curves) > 16 else 1)
    else:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_matrix(names: Sequence[str], matrix: np.ndarray, fmt: str = ".3f") -> str:
    """Rows and columns named; undefined values (NaN) as n/a, which the report explains."""
    rows = [[name, *(_number(v, fmt) for v in row)] for name, row in zip(names, matrix, strict=True)]
    return markdown_table(["", *names], rows)


def _number(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else "n/a"


TITLES = {  # metric -> heading and heatmap title; every metric here gets a heatmap
    "precision_at_k": "Precision@{k}, last layers",
    "precision_at_k_best_layers": "Precision@{k}, best layer pair",
    "precision_calibrated": "Precision@{k} minus permutation null, last layers",
    "precision_calibrated_best_layers": "Precision@{k} minus permutation null, best layer pair",
    "procrustes": "Orthogonal Procrustes similarity, last layers",
    "cka": "Linear CKA, last layers",
    "cka_debiased": "Debiased linear CKA, last layers",
    "rsa": "RSA (Spearman of cosine distances), last layers",
    "svcca": "SVCCA (mean of 10 canonical correlations), last layers",
    "cycle_knn": "Cycle kNN (k = {k}), last layers",
    "lcs_knn": "LCS kNN (k = {k}; in [0, k]), last layers",
    "edit_distance_knn": "Edit distance kNN (k = {k}), last layers",
    "cknna": "CKNNA (k = {k}), last layers",
}
FAMILY = ("cycle_knn", "lcs_knn", "edit_distance_knn", "cknna")
COMPANIONS = ("procrustes", "cka", "cka_debiased", "rsa", "svcca")


def render(summary: Mapping, matrices: Mapping[str, np.ndarray], sweep: Sequence[Mapping],
           baseline: Sequence[Mapping], extra_sections: Mapping[str, str]) -> str:
    """report.md: settings, headline table, the language-model baseline (``baseline`` records), matrices,
    k sweep, then ``extra_sections`` in order."""
    n, k, chance, s = summary["n"], summary["k"], summary["chance"], summary["settings"]
    names = [space["name"] for space in summary["spaces"]]
    ci = f"{s['ci_level']:.0%} CI"
    out = [
        "# Alignment report",
        f"{len(names)} spaces over N = {n} instructions. precision@k with k = {k}: the mean over instructions of "
        f"the fraction of their k nearest neighbours (cosine, ties to the lower index) shared by two spaces. "
        f"Chance level k/(N-1) = {chance:.4f}. Permutation null: {s['permutations']} random relabellings of "
        f"the second space's instructions; bootstrap: {s['bootstrap']} resamples of the instructions, "
        f"percentile intervals (for the best pair, at the chosen layers). Outlier clamp at the 95th "
        f"percentile of |x|: "
        f"{'on' if s['clamp_outliers'] else 'off'}. Centring (each space's mean vector subtracted before "
        f"cosine, align.center): {'on' if s['center'] else 'off'}.",
        markdown_table(["space", "kind", "layers", "width", "mean cosine"],
                       [[sp["name"], sp["kind"], sp["layers"], sp["width"], f"{sp['mean_cosine']:.3f}"]
                        for sp in summary["spaces"]]),
        "Kind: from each table's metadata. Mean cosine: the mean cosine similarity over pairs of distinct "
        "instructions at the last layer, as stored (before centring): near 0 for an isotropic space, near 1 "
        "when every instruction shares one dominant direction (typical of decoder states), which then "
        "weighs in every cosine; align.center removes it.",
        "Layers are numbered along each table's layer axis from 0 (for tables that keep every layer of a "
        "Hugging Face model, 0 is the input embeddings). Each pair is scored at its last layers and at its "
        "best layer pair, the maximum of precision@k over all layer pairs of the two spaces (as the Platonic "
        "Representation Hypothesis code does). Maxima over layers and wide features inflate raw scores, so "
        "every score also comes permutation-calibrated: raw minus the mean of its permutation null, with the "
        "one-sided p-value (1 + #{null >= raw}) / (1 + permutations). The best-pair null is the null of the "
        "same maximum over layer pairs.",
        f"## Headline: precision@{k}",
        markdown_table(
            ["A", "B", "last layers", "precision", ci, "calibrated", "p", "best layers", "precision", ci,
             "calibrated", "p"],
            [[pair["a"], pair["b"], *(cell for which in ("last", "best") for cell in _headline(pair[which]))]
             for pair in summary["pairs"]]),
        *_baseline_section(summary, baseline),
    ]
    for metric in ("precision_at_k", "precision_at_k_best_layers", "precision_calibrated",
                   "precision_calibrated_best_layers"):
        out += [f"### {TITLES[metric].format(k=k)}", markdown_matrix(names, matrices[metric])]
    out.append("## Companion metrics, last layers")
    if s["rsa_instructions"] < n:
        out.append(f"RSA is computed on a fixed random subset of {s['rsa_instructions']} instructions "
                   "(it needs N^2 memory; align.rsa_max_n).")
    for metric in COMPANIONS:
        out += [f"### {TITLES[metric]}", markdown_matrix(names, matrices[metric])]
    out += [
        "## The Platonic Representation Hypothesis metric family, last layers",
        "Huh et al. (2024)'s kNN metrics beside mutual kNN (precision@k above), read from the same neighbour "
        "lists (unit rows, self excluded, ties to the lower index): cycle kNN, the fraction of instructions "
        "that are among the A-neighbours of one of their B-neighbours (row A, column B; not symmetric); LCS "
        "kNN, the mean longest common subsequence of the two ordered lists (in [0, k], not divided by k, as "
        "in that code); edit distance kNN, 1 - mean Levenshtein distance / k; CKNNA, unbiased CKA restricted "
        "to pairs that are neighbours in both spaces (row A, column B). Each comes with its permutation null "
        "(the same relabellings as precision@k's): the calibrated value is raw minus the null's mean, with "
        "the one-sided p-value below it.",
    ]
    for metric in FAMILY:
        calibrated = np.asarray(matrices[metric + "_calibrated"])
        p = np.asarray(matrices[metric + "_p_value"])
        cells = [[f"{_number(c, '+.3f')} (p {_number(q, '.3g')})" for c, q in zip(rc, rp, strict=True)]
                 for rc, rp in zip(calibrated, p, strict=True)]
        out += [f"### {TITLES[metric].format(k=k)}", markdown_matrix(names, matrices[metric]),
                "Calibrated:", markdown_table(["", *names], [[name, *row] for name, row in
                                                           zip(names, cells, strict=True)])]
    out += [f"## Ties at the {k}th neighbour, last layers",
            "The share of instructions whose k-th and (k+1)-th nearest neighbours are equally similar (after "
            "rounding to 1e-6): there the tie rule (lower index) picks which of the tied instructions are "
            "counted, so those instructions' kNN scores depend on instruction order. Bag-of-words spaces and "
            "input layers, which give instructions made of the same words the same vector, have many.",
            markdown_table(["space", "instructions with a tie at k"],
                           [[sp["name"], f"{sp['ties_at_k']:.1%}"] for sp in summary["spaces"]])]
    if summary["skipped_layers"] or summary["undefined"]:
        out.append("## Left out, and why")
    if summary["skipped_layers"]:
        out.append("Layers where every instruction has the same vector (e.g. a first-token state at the input "
                   "layer) tell instructions apart by nothing, so they are left out of the layer search and "
                   "the per-layer curves: " + ", ".join(f"{e['space']} layer {e['layer']}"
                                                        for e in summary["skipped_layers"]) + ".")
    if summary["undefined"]:
        out.append("Values shown as n/a are undefined for a space (its row and column):")
        out.append("\n".join(f"- {e['metric']}, {e['space']}: {e['reason']}." for e in summary["undefined"]))
    ks = sorted({r["k"] for r in sweep})
    table = {(r["a"], r["b"]): {} for r in sweep}
    for r in sweep:
        table[r["a"], r["b"]][r["k"]] = r["precision"]
    out += [
        f"## k sweep, last layers (N = {n})",
        "Mutual-kNN agreement depends on N as well as k (it falls as N grows at fixed k), so these figures "
        f"hold for N = {n}.",
        markdown_table(["A", "B", *(f"k={kk}" for kk in ks)],
                       [[a, b, *(f"{row[kk]:.3f}" for kk in ks)] for (a, b), row in table.items()]
                       + [["chance", "", *(f"{kk / (n - 1):.3f}" for kk in ks)]]),
    ]
    if s["sweep_skipped"]:
        out.append(f"Not computed (k must be below N = {n}): k = {', '.join(map(str, s['sweep_skipped']))}.")
    for heading, body in extra_sections.items():
        out += [f"## {heading}", body.strip()]
    return "\n\n".join(out) + "\n"


def _baseline_section(summary: Mapping, records: Sequence[Mapping]) -> list[str]:
    """The paper's comparison: action~LM beside LM~LM within each family (lvaa_jax/alignment/baseline.py)."""
    k, ci = summary["k"], f"{summary['settings']['ci_level']:.0%} CI"
    out = ["## Language-model baseline",
           f"The paper reads action~LLM precision@{k} as \"approaching the alignment observed among language "
           "models themselves\". For each family of language models in the panel (kinds from the tables' "
           "metadata: decoders; encoders; CLIP and BLIP as vision-language models), each model's agreement "
           "with the action space beside its mean agreement with the other models of its family, and the "
           "family means (mean rows: every action~model pair against every model~model pair). The ratio "
           "divides the calibrated means (chance removed); its interval and the difference's come from the "
           "bootstrap resamples that give every pair's interval, applied to all pairs alike."]
    if not summary["baseline"]:
        return out + ["Not available: the panel has no action space or no language model (tables of kind "
                      "decoder, encoder, clip or blip)."]
    for which, heading in (("last", "last layers"), ("best", "best layer pairs (maxima, calibrated against "
                                                               "the null of the same maximum)")):
        rows = [[r["action"], r["family"], f"**{r['model']}**" if r["model"] == "mean" else r["model"],
                 f"{r['action_precision']:.3f}", f"[{r['action_ci_low']:.3f}, {r['action_ci_high']:.3f}]",
                 f"{r['action_calibrated']:+.3f}", r["peers"] or "all pairs", _number(r["peer_precision"], ".3f"),
                 f"[{_number(r['peer_ci_low'], '.3f')}, {_number(r['peer_ci_high'], '.3f')}]",
                 _number(r["peer_calibrated"], "+.3f"), _number(r["ratio_calibrated"], ".0%"),
                 f"[{_number(r['ratio_ci_low'], '.0%')}, {_number(r['ratio_ci_high'], '.0%')}]"]
                for r in records if r["layers"] == which]
        out += [f"### {heading.capitalize()}",
                "\n".join(f"- {family['sentence']}" for family in summary["baseline"] if family["layers"] == which),
                markdown_table(["action", "family", "model", "action~model", ci, "calibrated", "peers",
                                "model~peers", ci, "calibrated", "ratio", ci], rows)]
    return out


def _headline(values: Mapping) -> list[str]:
    return [
        "/".join(map(str, values["layers"])),
        f"{values['precision']:.3f}",
        f"[{values['ci_low']:.3f}, {values['ci_high']:.3f}]",
        f"{values['calibrated']:+.3f}",
        f"{values['p_value']:.3g}",
    ]
