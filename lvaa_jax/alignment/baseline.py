"""The language-model baseline: the paper's comparison, action~LM beside the alignment among LMs themselves.

Milano & Nolfi (2026) read action~decoder precision@15 (0.70-0.73) as "approaching the alignment observed
among language models themselves". Here that is a measurement: for each family of language models in the
panel (decoders, encoders, vision-language models) and each action space, action~model beside
model~(the other models of its family), and the family means; the ratio of the calibrated means and the
difference come with bootstrap intervals from the same resamples of instructions as every pair's (one
resample weights every pair alike, so the comparison is paired).

A space's kind comes from its table's metadata (``kind``), never from its name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lvaa_jax.alignment.stats import percentile_interval

# Table kind -> the family of language models it is compared within.
FAMILIES = {"decoder": "decoder", "encoder": "encoder", "clip": "vision-language", "blip": "vision-language"}
PLURALS = {"decoder": "decoders", "encoder": "encoders", "vision-language": "vision-language models"}
ACTION, CONTROL = "action", "control"
VALUES = ("precision", "ci_low", "ci_high", "calibrated")


def space_kind(meta: Mapping) -> str:
    """``action``, ``control``, or a language model's kind (``decoder``, ``encoder``, ``clip``, ``blip``) from
    a table's metadata. Tables written before the ``kind`` field are read from what they record: a control
    names its ``control``; the agent its ``checkpoint_step``, 0 for the untrained agent, a control too."""
    if meta.get("kind"):
        return str(meta["kind"])
    if "control" in meta:
        return CONTROL
    if "checkpoint_step" in meta:
        return ACTION if meta["checkpoint_step"] > 0 else CONTROL
    return "unknown"


def language_model_baseline(names: Sequence[str], kinds: Sequence[str], space_pairs: np.ndarray,
                            scores: Mapping[str, Mapping[str, np.ndarray]], boot: Mapping[str, np.ndarray],
                            level: float) -> dict:
    """Rows and sentences of the baseline.

    ``scores[which]`` (``which``: ``last`` or ``best`` layers) holds the per-pair arrays of the headline
    (``precision``, ``null_mean``, ``calibrated``, ``ci_low``, ``ci_high``, ``p_value``, over the rows of
    ``space_pairs``) and ``boot[which]`` the bootstrap resamples of every pair's precision, [R, P].
    Returns ``records`` (one per action space, family, model and layers, plus a ``mean`` row per family)
    and ``families`` (per action space, family and layers: the comparison, with its sentence).
    """
    column = {}
    for p, (a, b) in enumerate(space_pairs):
        column[a, b] = column[b, a] = p
    members: dict[str, list[int]] = {}
    for index, kind in enumerate(kinds):
        if kind in FAMILIES:
            members.setdefault(FAMILIES[kind], []).append(index)
    records, families = [], []
    for action in (i for i, kind in enumerate(kinds) if kind == ACTION):
        for family, models in members.items():
            within = [column[a, b] for i, a in enumerate(models) for b in models[i + 1:]]
            for which in scores:
                compare = _Comparison(scores[which], boot[which], level)
                for m in models:
                    peers = [column[m, other] for other in models if other != m]
                    records.append({"layers": which, "action": names[action], "family": family, "model": names[m],
                                    "peers": " ".join(names[o] for o in models if o != m),
                                    **compare(column[action, m], peers)})
                summary = compare([column[action, m] for m in models], within)
                records.append({"layers": which, "action": names[action], "family": family, "model": "mean",
                                "peers": "", **summary})
                families.append({"layers": which, "action": names[action], "family": family,
                                 "models": [names[m] for m in models], **summary,
                                 "sentence": sentence(names[action], family, [names[m] for m in models], which,
                                                      summary, level)})
    return {"records": records, "families": families}


class _Comparison:
    """The action pairs' mean beside the peer pairs' mean, at one choice of layers."""

    def __init__(self, values: Mapping[str, np.ndarray], boot: np.ndarray, level: float):
        self.values, self.boot, self.level = values, boot, level

    def __call__(self, action_pairs: int | list[int], peer_pairs: list[int]) -> dict:
        action_pairs = np.atleast_1d(action_pairs)
        nan = float("nan")
        row = {f"action_{key}": v for key, v in self._mean(action_pairs).items()}
        row["action_p_value"] = float(self.values["p_value"][action_pairs[0]]) if len(action_pairs) == 1 else nan
        if not peer_pairs:
            return row | {f"peer_{key}": nan for key in VALUES} | dict.fromkeys(
                ("ratio_calibrated", "ratio_ci_low", "ratio_ci_high", "difference", "difference_ci_low",
                 "difference_ci_high"), nan)
        row |= {f"peer_{key}": v for key, v in self._mean(peer_pairs).items()}
        (action_boot, action_null), (peer_boot, peer_null) = self._draws(action_pairs), self._draws(peer_pairs)
        ratio_low, ratio_high = percentile_interval((action_boot - action_null) / (peer_boot - peer_null), self.level)
        difference_low, difference_high = percentile_interval(action_boot - peer_boot, self.level)
        return row | {
            "ratio_calibrated": row["action_calibrated"] / row["peer_calibrated"],
            "ratio_ci_low": float(ratio_low), "ratio_ci_high": float(ratio_high),
            "difference": row["action_precision"] - row["peer_precision"],
            "difference_ci_low": float(difference_low), "difference_ci_high": float(difference_high),
        }

    def _draws(self, pairs) -> tuple[np.ndarray, float]:
        """The bootstrap resamples of the pairs' mean precision, and the mean of their null means."""
        return self.boot[:, pairs].mean(1), float(self.values["null_mean"][pairs].mean())

    def _mean(self, pairs) -> dict[str, float]:
        draws, _ = self._draws(pairs)
        low, high = percentile_interval(draws, self.level)
        return {"precision": float(self.values["precision"][pairs].mean()), "ci_low": float(low),
                "ci_high": float(high), "calibrated": float(self.values["calibrated"][pairs].mean())}


def sentence(action: str, family: str, models: Sequence[str], which: str, comparison: Mapping, level: float) -> str:
    """The paper's comparison, stated from the numbers whatever they are."""
    c = comparison
    plural = PLURALS[family]
    where = "last layers" if which == "last" else "best layer pairs"
    if len(models) < 2:
        return (f"{plural.capitalize()}, {where}: only one in the panel ({models[0]}), so there is no "
                f"{family}~{family} alignment to set {action}~{family} ({c['action_precision']:.3f}) beside; add "
                "a second one to the panel (configs/models.py).")
    if c["difference_ci_high"] < 0:
        verdict = f"below the alignment among the {plural} themselves"
    elif c["difference_ci_low"] > 0:
        verdict = f"above the alignment among the {plural} themselves"
    else:
        verdict = f"level with the alignment among the {plural} themselves (the interval of the difference holds 0)"
    ci = f"{level:.0%} CI"
    return (f"{plural.capitalize()} ({', '.join(models)}), {where}: {action}~{family} {c['action_precision']:.3f} "
            f"against {family}~{family} {c['peer_precision']:.3f} (difference {c['difference']:+.3f}, {ci} "
            f"[{c['difference_ci_low']:+.3f}, {c['difference_ci_high']:+.3f}]; calibrated "
            f"{c['action_calibrated']:.3f} against {c['peer_calibrated']:.3f}): the agent is at "
            f"{c['ratio_calibrated']:.0%} ({ci} {c['ratio_ci_low']:.0%}-{c['ratio_ci_high']:.0%}) of the "
            f"inter-{family} alignment, {verdict}.")
