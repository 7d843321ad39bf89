"""fedllm.eval.roc: AUC and TPR at FPR (lower score = member) against hand-computed values,
and bootstrap intervals on score sets whose answer is known."""

import numpy as np
import pytest

from fedllm.eval.roc import (
    attack_summary,
    bootstrap,
    matched_counts,
    non_members_needed,
    paired_auc_difference,
    percentile_interval,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
    weighted_stats,
)


def test_auc_counts_pairs_and_ties_half() -> None:
    members = [1.0, 2.0, 3.0]
    non = [2.0, 4.0]
    # pairs (m < n): 1<2, 1<4, 2<4, 3<4 = 4; ties: 2=2 -> 0.5; total 6 pairs
    assert roc_auc(members, non) == pytest.approx(4.5 / 6)
    assert roc_auc([0.0, 0.1], [1.0, 2.0]) == 1.0
    assert roc_auc([5.0], [1.0]) == 0.0


def test_roc_curve_points() -> None:
    fpr, tpr = roc_curve([1.0, 3.0], [2.0, 4.0])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_tpr_at_fpr_is_best_tpr_with_strictly_lower_fpr() -> None:
    members = [0.1, 0.2, 0.3, 0.6, 0.9]
    non = [0.25, 0.5, 0.7, 0.8]  # each false positive costs FPR 0.25
    # FPR < 0.3 allows one false positive (0.25): best threshold 0.5 -> TPR 3/5
    assert tpr_at_fpr(members, non, fpr=0.3) == pytest.approx(0.6)
    # FPR < 0.25 allows none: threshold 0.2 -> TPR 2/5
    assert tpr_at_fpr(members, non, fpr=0.25) == pytest.approx(0.4)
    assert tpr_at_fpr(members, non, fpr=1.0) == pytest.approx(0.8)  # FPR 1 itself excluded


def test_summary_flags_too_few_non_members() -> None:
    s = attack_summary([0.0] * 5, [1.0] * 150)
    assert s["auc"] == 1.0
    assert s["tpr@fpr<0.01"] == {
        "value": 1.0,
        "enough_non_members": True,
        "needs_non_members": 101,
        "interval": [1.0, 1.0],
    }
    assert s["tpr@fpr<0.001"]["enough_non_members"] is False
    assert s["tpr@fpr<0.001"]["needs_non_members"] == 1001


def test_exactly_one_over_alpha_non_members_still_allow_no_false_positive() -> None:
    """FPR < 1% is strict: 100 non-members allow 0 false positives (1/100 is not < 0.01), so the
    value is the TPR at zero false positives and is flagged; 101 allow one."""
    members = [0.5, 1.5, 2.5]
    at_100 = attack_summary(members, [float(v) for v in range(1, 101)], resamples=0)
    assert at_100["tpr@fpr<0.01"] == {
        "value": pytest.approx(1 / 3),  # threshold below the first non-member (1.0)
        "enough_non_members": False,
        "needs_non_members": 101,
    }
    at_101 = attack_summary(members, [float(v) for v in range(1, 102)], resamples=0)
    assert at_101["tpr@fpr<0.01"]["value"] == pytest.approx(2 / 3)  # one false positive: 1.0
    assert at_101["tpr@fpr<0.01"]["enough_non_members"] is True
    assert [non_members_needed(a) for a in (0.01, 0.001, 0.25, 0.3, 1.0)] == [101, 1001, 5, 4, 2]


def test_empty_or_nan_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="members and non-members"):
        roc_auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([float("nan")], [1.0])


def test_tpr_at_fpr_on_small_hand_arrays() -> None:
    # 10 non-members 1..10, members 0.5, 1.5, 2.5, 11: FPR < 0.25 allows 2 false positives
    # (2/10 < 0.25, 3/10 is not), so the threshold sits below the 3rd non-member (3.0)
    members, non = [0.5, 1.5, 2.5, 11.0], [float(v) for v in range(1, 11)]
    assert tpr_at_fpr(members, non, fpr=0.25) == pytest.approx(3 / 4)
    assert tpr_at_fpr(members, non, fpr=0.2) == pytest.approx(2 / 4)  # 2/10 is not < 0.2
    assert tpr_at_fpr(members, non, fpr=0.05) == pytest.approx(1 / 4)  # none: below 1.0
    # a tie with the first non-member is not below it: threshold 1.0 would be a false positive
    assert tpr_at_fpr([1.0, 2.0], [1.0, 5.0], fpr=0.5) == 0.0


def test_resample_statistics_equal_the_resampled_arrays() -> None:
    rng = np.random.default_rng(3)
    for _ in range(30):  # small integer scores: many ties
        m = rng.integers(0, 6, size=rng.integers(1, 20)).astype(float)
        n = rng.integers(0, 6, size=rng.integers(1, 120)).astype(float)
        wm = rng.multinomial(len(m), np.full(len(m), 1 / len(m)), size=4)
        wn = rng.multinomial(len(n), np.full(len(n), 1 / len(n)), size=4)
        stats = weighted_stats(
            m, n, member_counts=wm, non_member_counts=wn, fpr_levels=(0.01, 0.1, 0.3)
        )
        for row in range(4):
            mm, nn = np.repeat(m, wm[row]), np.repeat(n, wn[row])
            assert stats["auc"][row] == pytest.approx(roc_auc(mm, nn), abs=1e-12)
            for level in (0.01, 0.1, 0.3):
                expected = tpr_at_fpr(mm, nn, fpr=level)
                assert stats[f"tpr@fpr<{level:g}"][row] == pytest.approx(expected, abs=1e-12)


def test_separable_scores_give_the_degenerate_interval() -> None:
    s = attack_summary(np.linspace(0, 1, 40), np.linspace(2, 3, 120), resamples=500)
    assert s["auc"] == 1.0 and s["auc_interval"] == [1.0, 1.0]
    assert s["tpr@fpr<0.01"]["interval"] == [1.0, 1.0]  # every member below every non-member
    flipped = attack_summary(np.linspace(2, 3, 40), np.linspace(0, 1, 120), resamples=500)
    assert flipped["auc_interval"] == [0.0, 0.0]


def test_identical_distributions_contain_one_half() -> None:
    rng = np.random.default_rng(0)
    same = rng.normal(size=200)
    s = attack_summary(same, same.copy(), resamples=1000)  # the very same scores: AUC exactly ½
    assert s["auc"] == 0.5
    lo, hi = s["auc_interval"]
    assert lo < 0.5 < hi
    # the bootstrap spread matches the null standard error sqrt((m + n + 1) / (12 m n))
    se = np.sqrt((200 + 200 + 1) / (12 * 200 * 200))
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.15)
    draws = [
        attack_summary(rng.normal(size=100), rng.normal(size=100), resamples=300, seed=i)
        for i in range(20)
    ]
    assert sum(d["auc_interval"][0] <= 0.5 <= d["auc_interval"][1] for d in draws) >= 17


def test_bootstrap_is_seeded_and_keeps_strata() -> None:
    m, n = np.arange(6.0), np.arange(3.0, 9.0)
    a = bootstrap(m, n, resamples=50, seed=7)
    assert np.array_equal(a["auc"], bootstrap(m, n, resamples=50, seed=7)["auc"])
    assert not np.array_equal(a["auc"], bootstrap(m, n, resamples=50, seed=8)["auc"])
    # strata: client a's members all score 0, client b's all 10, non-members 5. Resampled within
    # clients every resample keeps 3 + 3 members, so AUC is exactly ½ each time; pooled, the
    # a/b mix varies and so does the AUC
    members, non = np.array([0.0] * 3 + [10.0] * 3), np.full(6, 5.0)
    strata = np.array(["a", "a", "a", "b", "b", "b"])
    kept = bootstrap(members, non, resamples=200, seed=1, member_strata=strata)
    assert np.all(kept["auc"] == 0.5)
    assert bootstrap(members, non, resamples=200, seed=1)["auc"].std() > 0.1
    with pytest.raises(ValueError, match="one stratum per score"):
        bootstrap(m, n, resamples=5, member_strata=["a"])


def test_percentile_interval_by_hand() -> None:
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx([5.0, 95.0])
    with pytest.raises(ValueError, match="confidence"):
        percentile_interval(np.arange(3.0), 1.0)


def test_paired_difference_cancels_what_both_models_share() -> None:
    rng = np.random.default_rng(5)
    base_m, base_n = rng.normal(0.2, 1, 150), rng.normal(0, 1, 150)  # a tilted split: AUC < ½
    same = paired_auc_difference(
        base_m, base_n, base_members=base_m, base_non_members=base_n, resamples=300
    )
    assert same == {"difference": 0.0, "interval": [0.0, 0.0]}
    view_m = base_m - 0.5  # training lowers every member's loss by 0.5
    d = paired_auc_difference(
        view_m, base_n, base_members=base_m, base_non_members=base_n, resamples=1000
    )
    assert d["difference"] == pytest.approx(roc_auc(view_m, base_n) - roc_auc(base_m, base_n))
    lo, hi = d["interval"]
    assert 0 < lo < d["difference"] < hi
    # narrower than the view's own AUC interval: the base's share of the noise cancels
    own = attack_summary(view_m, base_n, resamples=1000)["auc_interval"]
    assert hi - lo < 0.8 * (own[1] - own[0])
    with pytest.raises(ValueError, match="same members"):
        paired_auc_difference(view_m, base_n, base_members=base_m[:-1], base_non_members=base_n)
    # resamples=0 (--bootstrap 0): the difference alone, as attack_summary gives no interval
    bare = paired_auc_difference(
        view_m, base_n, base_members=base_m, base_non_members=base_n, resamples=0
    )
    assert bare == {"difference": d["difference"], "interval": None}


# two matched sets: non-member 1.0 with members 0.5, 0.6 (both below it: AUC 1 on their own) and
# non-member 3.0 with members 2.5, 4.0 (AUC ½ on their own); together AUC = 5/8
SET_NON, SET_MEMBERS, SETS = np.array([1.0, 3.0]), np.array([0.5, 0.6, 2.5, 4.0]), [0, 0, 1, 1]


def test_a_matched_set_resample_by_hand() -> None:
    """Drawing set 0 twice gives members 0.5, 0.5, 0.6, 0.6 against 1.0, 1.0: AUC 1; set 1 twice
    gives AUC ½; one of each is the sample itself, 5/8. Each member comes with its set."""
    wn = np.array([[2, 0], [1, 1], [0, 2]])
    wm = matched_counts(wn, SETS)
    assert wm.tolist() == [[2, 2, 0, 0], [1, 1, 1, 1], [0, 0, 2, 2]]
    stats = weighted_stats(
        SET_MEMBERS, SET_NON, member_counts=wm, non_member_counts=wn, fpr_levels=(0.6,)
    )
    assert stats["auc"].tolist() == [1.0, 5 / 8, 0.5]
    # FPR < 0.6 of 2 drawn non-members allows one: below the second, so every member but 4.0
    assert stats["tpr@fpr<0.6"].tolist() == [1.0, 3 / 4, 1 / 2]
    # seeded draws take only those three values, 5/8 about half the time (2 of 4 orders);
    # resampling members on their own would also give e.g. 0.5, 0.5, 0.6, 2.5 against 1.0, 3.0
    boot = bootstrap(SET_MEMBERS, SET_NON, resamples=400, seed=3, member_sets=SETS)["auc"]
    assert set(boot.tolist()) == {1.0, 5 / 8, 0.5}
    assert np.mean(boot == 5 / 8) == pytest.approx(0.5, abs=0.08)
    assert set(bootstrap(SET_MEMBERS, SET_NON, resamples=400, seed=3)["auc"]) > {1.0, 5 / 8, 0.5}


def test_matched_sets_are_resampled_within_strata() -> None:
    """Each set alone in its stratum: every resample is the sample itself, so the interval is the
    point; the members' strata must be their sets' strata."""
    s = attack_summary(
        SET_MEMBERS,
        SET_NON,
        resamples=50,
        member_sets=SETS,
        member_strata=["a", "a", "b", "b"],
        non_member_strata=["a", "b"],
    )
    assert s["auc"] == 5 / 8 and s["auc_interval"] == [5 / 8, 5 / 8]
    assert s["interval"]["resampled"] == "matched sets"
    assert attack_summary(SET_MEMBERS, SET_NON, resamples=5)["interval"]["resampled"] == "examples"
    with pytest.raises(ValueError, match="its non-member's"):
        bootstrap(
            SET_MEMBERS,
            SET_NON,
            member_sets=SETS,
            member_strata=list("abab"),
            non_member_strata=["a", "b"],
        )
    with pytest.raises(ValueError, match="one non-member index per member"):
        bootstrap(SET_MEMBERS, SET_NON, member_sets=[0, 1])
    with pytest.raises(ValueError, match="index the 2 non-members"):
        bootstrap(SET_MEMBERS, SET_NON, member_sets=[0, 0, 1, 2])


def test_matched_set_bootstrap_is_narrower_and_still_covers_a_matched_null() -> None:
    """The audit's simulation (h79 coverage.py/cluster.py), smaller: 96 non-members in 4
    clients, each matched to 2 members on a covariate that drives the score (β = 3), no
    membership effect. Resampling members and non-members independently counts the spread
    between sets that the matching cancels: ~3x too wide, 0.5 always inside. Resampling whole
    sets gives about the true spread and near-nominal coverage."""
    rng = np.random.default_rng(11)
    n_non, k, reps = 96, 2, 100
    strata, sets = np.repeat(np.arange(4), n_non // 4), np.repeat(np.arange(n_non), k)
    widths: dict[str, list[float]] = {"independent": [], "matched": []}
    inside = {"independent": 0, "matched": 0}
    aucs = []
    for r in range(reps):
        x = rng.normal(size=n_non)  # the matched covariate (length, domain)
        non, members = 3 * x + rng.normal(size=n_non), 3 * x[sets] + rng.normal(size=n_non * k)
        kw = {"resamples": 300, "seed": r, "fpr_levels": (), "non_member_strata": strata}
        for key, extra in (("independent", {}), ("matched", {"member_sets": sets})):
            boot = bootstrap(members, non, member_strata=strata[sets], **kw, **extra)["auc"]
            lo, hi = percentile_interval(boot, 0.95)
            widths[key].append(hi - lo)
            inside[key] += lo <= 0.5 <= hi
        aucs.append(roc_auc(members, non))
    true_width = 2 * 1.96 * np.std(aucs)  # what a 95% interval should span
    independent, matched = np.mean(widths["independent"]), np.mean(widths["matched"])
    assert independent > 2.2 * true_width and inside["independent"] == reps
    assert matched < 0.5 * independent
    assert 0.75 * true_width < matched < 1.3 * true_width
    assert 88 <= inside["matched"] <= 99  # nominal 95 of 100
