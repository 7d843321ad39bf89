"""fedllm.eval.roc: AUC and TPR at FPR (lower score = member) against hand-computed values."""

import pytest

from fedllm.eval.roc import attack_summary, roc_auc, roc_curve, tpr_at_fpr


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
    assert s["tpr@fpr<0.01"] == {"value": 1.0, "enough_non_members": True, "needs_non_members": 100}
    assert s["tpr@fpr<0.001"]["enough_non_members"] is False
    assert s["tpr@fpr<0.001"]["needs_non_members"] == 1000


def test_empty_or_nan_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="members and non-members"):
        roc_auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([float("nan")], [1.0])
