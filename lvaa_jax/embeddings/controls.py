"""Control spaces: what an alignment score is worth when there is no model behind one side.

Two instructions made of the same words are neighbours in any space that reads words, so part of any
alignment between language, vision-language and action spaces is lexical overlap; and with few
instructions, chance alone puts some neighbours in common. The bag-of-words space measures the first,
the random Gaussian space the second. (The third control, the untrained agent, lives with the agent.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lvaa_jax.errors import LvaaError


def check_instructions(instructions: Sequence[str], where: str) -> list[str]:
    """The instruction list every space embeds: non-empty strings, each once (a row is named by its text)."""
    if isinstance(instructions, str):
        raise LvaaError(f"{where}: instructions must be a list of strings, got the single string {instructions!r}")
    items = list(instructions)
    if not items:
        raise LvaaError(f"{where}: empty instruction list")
    seen: set[str] = set()
    for text in items:
        if not isinstance(text, str) or not text.strip():
            raise LvaaError(f"{where}: every instruction must be a non-blank string, got {text!r}")
        if text in seen:
            raise LvaaError(f"{where}: duplicate instruction {text!r}")
        seen.add(text)
    return items


def bag_of_words(
    instructions: Sequence[str], vocabulary: Sequence[str] | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Word counts [N, V] float32: the alignment that lexical overlap alone explains.

    Words are split as the agent's tokenizer splits them (lower case, commas as words). The default
    vocabulary is the sorted words of the instructions; a given vocabulary must cover every word, so that
    no instruction silently loses a word.
    """
    # Imported here: lvaa_jax.babyai pulls in minigrid, which scoring embeddings must not need.
    from lvaa_jax.babyai.tokenizer import split_words

    items = check_instructions(instructions, "bag_of_words")
    words = [split_words(text) for text in items]
    if vocabulary is None:
        vocab = sorted({w for ws in words for w in ws})
    else:
        vocab = list(vocabulary)
        if len(set(vocab)) != len(vocab):
            raise LvaaError(f"bag_of_words: the vocabulary lists {len(vocab) - len(set(vocab))} words twice")
    column = {w: j for j, w in enumerate(vocab)}
    counts = np.zeros((len(items), len(vocab)), np.float32)
    for row, (text, ws) in enumerate(zip(items, words, strict=True)):
        unknown = [w for w in ws if w not in column]
        if unknown:
            raise LvaaError(f"bag_of_words: instruction {text!r} has words outside the vocabulary: {unknown}")
        for w in ws:
            counts[row, column[w]] += 1
    return counts, {"control": "bag_of_words", "dim": len(vocab), "vocabulary": vocab}


def random_gaussian(n: int, dim: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """[n, dim] float32 standard normal rows, the same for the same seed: the alignment chance alone gives."""
    if n < 1 or dim < 1:
        raise LvaaError(f"random_gaussian: n and dim must be positive, got n={n}, dim={dim}")
    embeddings = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    meta = {
        "control": "random_gaussian",
        "dim": dim,
        "seed": seed,
        "generator": "numpy.random.default_rng(seed).standard_normal, float32",
        "numpy_version": np.__version__,
    }
    return embeddings, meta
