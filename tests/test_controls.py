"""The bag-of-words and random Gaussian control spaces."""

import numpy as np
import pytest

from lvaa_jax.embeddings import bag_of_words, check_instructions, random_gaussian
from lvaa_jax.errors import LvaaError

MISSIONS = [
    "put the red ball next to the blue key",
    "put the blue ball next to the red key",
    "go to the red ball, then open the door",
]


def test_bag_of_words_counts_words_over_the_sorted_vocabulary():
    counts, meta = bag_of_words(MISSIONS)
    vocab = meta["vocabulary"]
    assert vocab == sorted(vocab) and "," in vocab and counts.shape == (3, len(vocab)) == (3, meta["dim"])
    assert counts.dtype == np.float32
    assert counts[0, vocab.index("the")] == 2 and counts[2, vocab.index("then")] == 1
    np.testing.assert_array_equal(counts[0], counts[1])  # same words, swapped roles: identical rows
    assert counts.sum(1).tolist() == [9, 9, 10]


def test_bag_of_words_with_a_given_vocabulary():
    vocab = ["door", "go", "open", "the", "to", "then", ",", "ball", "red", "unused", "put", "next", "blue", "key"]
    counts, meta = bag_of_words(MISSIONS, vocabulary=vocab)
    assert meta["vocabulary"] == vocab and counts.shape == (3, len(vocab))
    assert counts[:, vocab.index("unused")].tolist() == [0, 0, 0]


@pytest.mark.parametrize("instructions, vocabulary, message", [
    ([], None, "empty instruction list"),
    (["go to the key", "go to the key"], None, "duplicate instruction 'go to the key'"),
    ("go to the key", None, "list of strings"),
    (["go to the key", "  "], None, "non-blank"),
    (["go to the key"], ["go", "to", "the"], r"outside the vocabulary: \['key'\]"),
    (["go to the key"], ["go", "go", "to", "the", "key"], "twice"),
])
def test_bag_of_words_refuses_bad_input(instructions, vocabulary, message):
    with pytest.raises(LvaaError, match=message) as info:
        bag_of_words(instructions, vocabulary)
    assert "\n" not in str(info.value)


def test_random_gaussian_is_deterministic():
    a, meta = random_gaussian(50, 16, seed=3)
    b, _ = random_gaussian(50, 16, seed=3)
    c, _ = random_gaussian(50, 16, seed=4)
    assert a.shape == (50, 16) and a.dtype == np.float32 and meta["seed"] == 3 and meta["dim"] == 16
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert abs(a.mean()) < 0.1 and abs(a.std() - 1) < 0.1


@pytest.mark.parametrize("n, dim", [(0, 8), (8, 0)])
def test_random_gaussian_refuses_empty_shapes(n, dim):
    with pytest.raises(LvaaError, match="must be positive"):
        random_gaussian(n, dim, seed=0)


def test_check_instructions_names_where():
    with pytest.raises(LvaaError, match="^embed.instructions: duplicate instruction 'a'$"):
        check_instructions(["a", "b", "a"], "embed.instructions")
