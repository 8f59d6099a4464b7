"""Word-level instruction tokenizer over the BabyAI grammar, built from the missions and saved with them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lvaa_jax.errors import LvaaError

PAD, UNK = "<pad>", "<unk>"
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-cased words, with punctuation (the commas of sequenced missions) as words of its own."""
    return _TOKEN.findall(text.lower())


class Tokenizer:
    """Maps a mission to word ids (0 is padding, 1 unknown) and back."""

    def __init__(self, words: Sequence[str]):
        self.vocabulary = [PAD, UNK, *words]
        self._ids = {w: i for i, w in enumerate(self.vocabulary)}

    @classmethod
    def from_missions(cls, missions: Iterable[str]) -> Tokenizer:
        return cls(sorted({w for m in missions for w in split_words(m)}))

    @property
    def size(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, 1) for w in split_words(text)]

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in split_words(text) if w not in self._ids]

    def decode(self, ids: Iterable[int]) -> str:
        words = [self.vocabulary[i] for i in ids if i != 0]
        text = " ".join(words)
        return re.sub(r" ([^\sa-z0-9<>])", r"\1", text)

    def encode_batch(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """int32 ids [N, length] padded on the right, and the bool mask of real tokens."""
        ids = np.zeros((len(texts), length), np.int32)
        for row, text in enumerate(texts):
            tokens = self.encode(text)
            if len(tokens) > length:
                raise LvaaError(f"instruction {text!r} has {len(tokens)} words, more than the model's {length}")
            ids[row, : len(tokens)] = tokens
        return ids, ids != 0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"vocabulary": self.vocabulary}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        vocabulary = json.loads(Path(path).read_text())["vocabulary"]
        if vocabulary[:2] != [PAD, UNK]:
            raise LvaaError(f"{path}: not a lvaa_jax vocabulary (must start with {PAD}, {UNK})")
        return cls(vocabulary[2:])
