"""Text-overlap metrics for generations: exact match and ROUGE-L (LCS F-measure), no extra deps."""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Lower-case, words only, single spaces: what exact match compares."""
    return " ".join(_WORD.findall(text.lower()))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal after `normalize`, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a)·len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_tokens(prediction: Sequence, reference: Sequence) -> float:
    """ROUGE-L F1 between two token sequences (1.0 when both are empty)."""
    if not prediction and not reference:
        return 1.0
    lcs = lcs_length(prediction, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalized words."""
    return rouge_l_tokens(normalize(prediction).split(), normalize(reference).split())
