"""ROC AUC and TPR at a low FPR for membership scores where LOWER means "member".

Definitions (members are the positives; an example is called a member when score <= t):
  TPR(t) = #(members with score <= t) / #members,  FPR(t) = #(non-members with score <= t) / #non.
  AUC = P(member score < non-member score) + ½ P(equal)   (Mann-Whitney, ties count half).
  TPR@FPR<α = max over thresholds t (including "call nothing a member") of TPR(t) with FPR(t) < α.
FPR < α is strict, so n non-members allow a false positive only when 1/n < α, i.e. n > 1/α (101
for 1 %, 1001 for 0.1 %). With fewer, the value is the TPR at zero false positives and says nothing
about the α level: `enough_non_members` is then False.

Intervals: percentile bootstrap (seeded, 1,000 resamples by default), within each stratum when
strata are given (e.g. the client each example came from, so a pooled resample keeps every
client's share). With matched sets (`member_sets`: each member's non-member, as
fedllm.eval.membership matches K members to each non-member) whole sets are resampled: a
non-member is drawn with replacement and its members come with it, as often as it is drawn. That
keeps the pairing that makes members and non-members alike, so the interval reflects only what
differs within sets; resampling members and non-members independently (the fallback without
sets) also counts the between-set spread the matching cancels: up to ~3x too wide when what was
matched on (length, domain) drives the score (tests/test_eval_roc.py). Each resample's AUC and
TPR@FPR are exactly `roc_auc` / `tpr_at_fpr` of the resampled arrays, computed from resample
counts on the sorted scores instead of materialising the arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FPR_LEVELS = (0.01, 0.001)
RESAMPLES = 1000
CONFIDENCE = 0.95


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


def attack_summary(
    members: Sequence[float],
    non_members: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    member_strata: Sequence | None = None,
    non_member_strata: Sequence | None = None,
    member_sets: Sequence[int] | None = None,
) -> dict:
    """AUC and TPR at each FPR level with bootstrap intervals (resamples=0: no intervals);
    with `member_sets`, matched sets are resampled whole (see `bootstrap`)."""
    out: dict = {
        "auc": roc_auc(members, non_members),
        "members": len(members),
        "non_members": len(non_members),
    }
    boot = None
    if resamples:
        boot = bootstrap(
            members,
            non_members,
            resamples=resamples,
            seed=seed,
            member_strata=member_strata,
            non_member_strata=non_member_strata,
            member_sets=member_sets,
        )
        out["auc_interval"] = percentile_interval(boot["auc"], confidence)
        out["interval"] = {
            "resamples": resamples,
            "confidence": confidence,
            "seed": seed,
            "resampled": "examples" if member_sets is None else "matched sets",
        }
    for level in FPR_LEVELS:
        entry: dict = {
            "value": tpr_at_fpr(members, non_members, fpr=level),
            "enough_non_members": _allowed_false_positives(len(non_members), level) >= 1,
            "needs_non_members": non_members_needed(level),
        }
        if boot is not None:
            entry["interval"] = percentile_interval(boot[f"tpr@fpr<{level:g}"], confidence)
        out[f"tpr@fpr<{level:g}"] = entry
    return out


def paired_auc_difference(
    members: Sequence[float],
    non_members: Sequence[float],
    *,
    base_members: Sequence[float],
    base_non_members: Sequence[float],
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    member_strata: Sequence | None = None,
    non_member_strata: Sequence | None = None,
    member_sets: Sequence[int] | None = None,
) -> dict:
    """AUC − base AUC on the same examples, with an interval from resampling examples (or, with
    `member_sets`, matched sets) jointly (resamples=0: no interval, None).

    Pairing removes what both models see alike (e.g. a held-out split that happens to be harder),
    so the interval is narrower than either AUC's and measures what training added.
    """
    if len(base_members) != len(members) or len(base_non_members) != len(non_members):
        raise ValueError("the base scores must be of the same members and non-members")
    point = roc_auc(members, non_members) - roc_auc(base_members, base_non_members)
    if not resamples:
        return {"difference": point, "interval": None}
    kw = {
        "resamples": resamples,
        "seed": seed,
        "fpr_levels": (),
        "member_strata": member_strata,
        "non_member_strata": non_member_strata,
        "member_sets": member_sets,
    }
    diff = bootstrap(members, non_members, **kw)["auc"]
    diff = diff - bootstrap(base_members, base_non_members, **kw)["auc"]  # same draws: seeded
    return {"difference": point, "interval": percentile_interval(diff, confidence)}


def percentile_interval(values: np.ndarray, confidence: float) -> list[float]:
    """[lo, hi]: the (1 − c)/2 and (1 + c)/2 quantiles of bootstrap values."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(np.asarray(values, dtype=float), [tail, 1 - tail])
    return [float(lo), float(hi)]


def bootstrap(
    members: Sequence[float],
    non_members: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    fpr_levels: Sequence[float] = FPR_LEVELS,
    member_strata: Sequence | None = None,
    non_member_strata: Sequence | None = None,
    member_sets: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """AUC and TPR@FPR<α of `resamples` stratified bootstrap resamples (one value each).

    Without `member_sets`, members and non-members are resampled independently, each within its
    strata. With them (member i belongs to non-member member_sets[i]), non-members are resampled
    within their strata and each member is drawn as often as its non-member: the matched set
    is the unit, as the sample was drawn.
    """
    m, n = _check(members, non_members)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    if member_sets is not None:
        sets = _check_sets(member_sets, members=len(m), non_members=len(n))
        if member_strata is not None and (
            non_member_strata is None
            or not np.array_equal(np.asarray(member_strata), np.asarray(non_member_strata)[sets])
        ):
            raise ValueError("with member_sets, each member's stratum must be its non-member's")
        wn = _resample_counts(
            len(n), non_member_strata, resamples=resamples, rng=rng, name="non_member_strata"
        )
        return weighted_stats(
            m,
            n,
            member_counts=matched_counts(wn, sets),
            non_member_counts=wn,
            fpr_levels=fpr_levels,
        )
    wm = _resample_counts(len(m), member_strata, resamples=resamples, rng=rng, name="member_strata")
    wn = _resample_counts(
        len(n), non_member_strata, resamples=resamples, rng=rng, name="non_member_strata"
    )
    return weighted_stats(m, n, member_counts=wm, non_member_counts=wn, fpr_levels=fpr_levels)


def matched_counts(non_member_counts: np.ndarray, member_sets: Sequence[int]) -> np.ndarray:
    """Members' draw counts of matched-set resamples: each member as often as its non-member
    (`non_member_counts` is (resamples, non-members); the result (resamples, members))."""
    return np.asarray(non_member_counts)[:, np.asarray(member_sets, dtype=np.int64)]


def weighted_stats(
    members: np.ndarray,
    non_members: np.ndarray,
    *,
    member_counts: np.ndarray,
    non_member_counts: np.ndarray,
    fpr_levels: Sequence[float] = FPR_LEVELS,
) -> dict[str, np.ndarray]:
    """AUC and TPR@FPR<α of each row's resample: score i drawn counts[row, i] times."""
    m, n = _check(members, non_members)
    m_order, n_order = np.argsort(m, kind="stable"), np.argsort(n, kind="stable")
    sm, sn = m[m_order], n[n_order]
    wm = np.asarray(member_counts, float)[:, m_order]
    wn = np.asarray(non_member_counts, float)[:, n_order]
    rows, size_m, size_n = len(wm), wm.sum(axis=1), wn.sum(axis=1)
    # cumulative resample counts over the sorted scores, with a leading 0 column
    cm = np.concatenate([np.zeros((rows, 1)), np.cumsum(wm, axis=1)], axis=1)
    cn = np.concatenate([np.zeros((rows, 1)), np.cumsum(wn, axis=1)], axis=1)
    # AUC: each member counts the non-members above it, and half of those equal to it
    le = cn[:, np.searchsorted(sn, sm, side="right")]
    lt = cn[:, np.searchsorted(sn, sm, side="left")]
    above = size_n[:, None] - le + 0.5 * (le - lt)
    out = {"auc": (wm * above).sum(axis=1) / (size_m * size_n)}
    for level in fpr_levels:
        # FPR < α allows k false positives, k the largest integer with k / n < α; the best
        # threshold sits just below the (k+1)-th smallest non-member v, so TPR = #(members < v)/m
        sizes = {int(t): _allowed_false_positives(int(t), level) for t in np.unique(size_n)}
        k = np.array([sizes[int(t)] for t in size_n])
        first = (cn[:, 1:] >= (k + 1)[:, None]).argmax(axis=1)  # v's index in sorted non-members
        below = np.searchsorted(sm, sn[first], side="left")
        out[f"tpr@fpr<{level:g}"] = cm[np.arange(rows), below] / size_m
    return out


def non_members_needed(level: float) -> int:
    """The fewest non-members for which FPR < `level` allows one false positive (1/n < level):
    with fewer, TPR@FPR<level is the TPR at zero false positives."""
    if not 0 < level <= 1:
        raise ValueError(f"level must be in (0, 1], got {level}")
    n = max(math.floor(1 / level), 1)
    while n > 1 and _allowed_false_positives(n - 1, level) >= 1:
        n -= 1
    while _allowed_false_positives(n, level) < 1:
        n += 1
    return n


def _allowed_false_positives(n: int, level: float) -> int:
    """The largest k with k / n < level (as the float comparison in `tpr_at_fpr` decides)."""
    k = max(math.ceil(level * n) - 1, 0)
    while k + 1 <= n and (k + 1) / n < level:
        k += 1
    while k > 0 and k / n >= level:
        k -= 1
    return k


def _resample_counts(
    size: int, strata: Sequence | None, *, resamples: int, rng: np.random.Generator, name: str
) -> np.ndarray:
    """(resamples, size) draw counts: each stratum resampled to its own size, with replacement."""
    labels = np.zeros(size, dtype=int) if strata is None else np.asarray(strata)
    if labels.shape != (size,):
        raise ValueError(f"{name} must give one stratum per score ({size}), got {labels.shape}")
    drawn = np.empty((resamples, size), dtype=np.int64)
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        drawn[:, idx] = idx[rng.integers(0, len(idx), size=(resamples, len(idx)))]
    flat = drawn + size * np.arange(resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=size * resamples).reshape(resamples, size)


def _check_sets(member_sets: Sequence[int], *, members: int, non_members: int) -> np.ndarray:
    """member_sets as an index array: one non-member index per member, every one in range."""
    sets = np.asarray(member_sets)
    if sets.shape != (members,) or (members and not np.issubdtype(sets.dtype, np.integer)):
        raise ValueError(f"member_sets must give one non-member index per member ({members})")
    if members and (sets.min() < 0 or sets.max() >= non_members):
        raise ValueError(f"member_sets must index the {non_members} non-members")
    return sets.astype(np.int64)


def _check(members: Sequence[float], non_members: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(members, dtype=float)
    n = np.asarray(non_members, dtype=float)
    if m.size == 0 or n.size == 0:
        raise ValueError(f"need members and non-members, got {m.size} and {n.size}")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("membership scores must be finite")
    return m, n
