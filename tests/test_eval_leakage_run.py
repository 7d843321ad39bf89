"""fedllm.eval.leakage_run's pure parts: pooled matched sets and the base control."""

import numpy as np

from fedllm.eval.leakage_run import control_check, pooled_sets
from fedllm.eval.report import control_md


def test_pooled_sets_shift_each_clients_sets_past_the_clients_before() -> None:
    # client A: 3 non-members, members of sets 0, 0, 2 (set 1 lost its member); client B: 2
    # non-members, members of sets 0, 1, 1. Pooled non-members are A's 0..2 then B's 3..4.
    got = pooled_sets([[0, 0, 2], [0, 1, 1]], [3, 2])
    assert got.tolist() == [0, 0, 2, 3, 4, 4]
    assert got.dtype == np.int64
    assert pooled_sets([[1, 0]], [2]).tolist() == [1, 0]


def test_control_flags_only_intervals_without_one_half() -> None:
    pooled = {
        "loss": {"auc_interval": [0.45, 0.56]},
        "zlib": {"auc_interval": [0.51, 0.60]},
        "min_k": {"auc": 0.7},  # --bootstrap 0: no interval, nothing to check
    }
    assert control_check(pooled) == {"ok": False, "outside": {"zlib": [0.51, 0.60]}}


def test_control_without_any_interval_is_not_checked_rather_than_passed() -> None:
    # --bootstrap 0: an AUC of 0.76 under the base must not read as a passed control
    pooled = {"loss": {"auc": 0.76}, "zlib": {"auc": 0.71}}
    assert control_check(pooled) == {"ok": None, "outside": {}}
    assert control_check({"loss": {"auc_interval": [0.45, 0.56]}})["ok"] is True


def test_control_md_says_not_checked() -> None:
    lines = control_md({"ok": None, "outside": {}})
    assert "not checked" in lines[0] and "contains 0.5, so" not in lines[0]
