"""The pure text functions (tether.text) on hand-made inputs with hand-computed answers."""

from __future__ import annotations

import pytest

from tether import text as T


def test_words_lowercases_and_drops_punctuation():
    assert T.words("Hi, hi! Don't  stop-now.") == ["hi", "hi", "don", "t", "stop", "now"]
    assert T.words("") == []


def test_ngrams_counts():
    assert T.ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert T.ngrams(["a"], 2) == []
    with pytest.raises(ValueError):
        T.ngrams(["a"], 0)


def test_repetition_rate_hand_computed():
    # 3-grams abc bca cab abc: one of four repeats an earlier one
    assert T.repetition_rate("a b c a b c") == pytest.approx(0.25)
    # x x x x x: three 3-grams, all "x x x": two repeats
    assert T.repetition_rate("x x x x x") == pytest.approx(2 / 3)
    assert T.repetition_rate("Short text") == 0.0  # fewer than 3 words
    assert T.repetition_rate("The cat sat on the mat.") == 0.0
    assert T.repetition_rate("A, b. C! a b c", n=3) == pytest.approx(0.25)  # punctuation and case ignored
