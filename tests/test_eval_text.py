"""fedllm.eval.text: exact match and ROUGE-L against hand-computed values."""

import pytest

from fedllm.eval.text import exact_match, lcs_length, rouge_l, rouge_l_tokens


def test_lcs_and_rouge_l() -> None:
    assert lcs_length("abcbdab", "bdcaba") == 4
    # LCS("the cat sat", "the cat on the mat sat") = 3; P = 3/3, R = 3/6, F = 2/3
    assert rouge_l("The cat sat.", "the cat on the mat sat") == pytest.approx(2 / 3)
    assert rouge_l_tokens([], []) == 1.0
    assert rouge_l_tokens([1], [2]) == 0.0


def test_exact_match_ignores_case_and_punctuation() -> None:
    assert exact_match("A small dog!", "a small  dog") == 1.0
    assert exact_match("a small dog", "a big dog") == 0.0
