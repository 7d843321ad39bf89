"""ROC AUC and TPR at a low FPR for membership scores where LOWER means "member".

Definitions (members are the positives; an example is called a member when score <= t):
  TPR(t) = #(members with score <= t) / #members,  FPR(t) = #(non-members with score <= t) / #non.
  AUC = P(member score < non-member score) + ½ P(equal)   (Mann-Whitney, ties count half).
  TPR@FPR<α = max over thresholds t (including "call nothing a member") of TPR(t) with FPR(t) < α.
With fewer than 1/α non-members, FPR < α forces zero false positives, so the number says nothing
about the α level: `enough_non_members` is then False.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FPR_LEVELS = (0.01, 0.001)


def roc_auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """Probability that a random member scores lower than a random non-member (ties: ½)."""
    m, n = _check(members, non_members)
    less = (m[:, None] < n[None, :]).sum()
    equal = (m[:, None] == n[None, :]).sum()
    return float((less + 0.5 * equal) / (len(m) * len(n)))


def roc_curve(
    members: Sequence[float], non_members: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) up to (1, 1)."""
    m, n = _check(members, non_members)
    thresholds = np.unique(np.concatenate([m, n]))
    tpr = (m[None, :] <= thresholds[:, None]).mean(axis=1)
    fpr = (n[None, :] <= thresholds[:, None]).mean(axis=1)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def tpr_at_fpr(members: Sequence[float], non_members: Sequence[float], *, fpr: float) -> float:
    """The highest TPR over thresholds whose FPR is strictly below `fpr`."""
    if not 0 < fpr <= 1:
        raise ValueError(f"fpr must be in (0, 1], got {fpr}")
    fprs, tprs = roc_curve(members, non_members)
    return float(tprs[fprs < fpr].max())


def attack_summary(members: Sequence[float], non_members: Sequence[float]) -> dict:
    """AUC and TPR at each FPR level, saying whether there were enough non-members for each."""
    out: dict = {
        "auc": roc_auc(members, non_members),
        "members": len(members),
        "non_members": len(non_members),
    }
    for level in FPR_LEVELS:
        needed = math.ceil(1 / level)
        out[f"tpr@fpr<{level:g}"] = {
            "value": tpr_at_fpr(members, non_members, fpr=level),
            "enough_non_members": len(non_members) >= needed,
            "needs_non_members": needed,
        }
    return out


def _check(members: Sequence[float], non_members: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(members, dtype=float)
    n = np.asarray(non_members, dtype=float)
    if m.size == 0 or n.size == 0:
        raise ValueError(f"need members and non-members, got {m.size} and {n.size}")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("membership scores must be finite")
    return m, n
