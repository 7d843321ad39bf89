"""bench/_stats.py: t-intervals, paired differences over shared seeds, and the tie rule."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_stats", Path(__file__).parents[1] / "bench" / "_stats.py"
)
S = importlib.util.module_from_spec(_spec)
sys.modules["bench_stats"] = S  # dataclasses look their module up there
_spec.loader.exec_module(S)

T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824}  # Student t quantiles from a printed table


def test_t_interval_by_hand() -> None:
    # 1, 2, 3: mean 2, sample sd 1, half-width t(0.975, 2)·1/√3 = 4.3027/1.7321 = 2.4841.
    iv = S.t_interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.half == pytest.approx(T_975[2] / math.sqrt(3), abs=1e-4)
    assert (iv.low, iv.high) == pytest.approx((2.0 - 2.4841, 2.0 + 2.4841), abs=1e-4)
    # Two values 3.0 and 3.2: sd 0.1414, half-width 12.7062·0.1414/√2 = 1.2706.
    assert S.t_interval([3.0, 3.2]).half == pytest.approx(1.2706, abs=1e-4)
    # Four values 0, 0, 1, 1: sd 0.5774, half-width 3.1824·0.5774/2 = 0.9187.
    assert S.t_interval([0, 0, 1, 1]).half == pytest.approx(0.9187, abs=1e-4)
    # A wider level is wider.
    assert S.t_interval([1.0, 2.0, 3.0], level=0.99).half > iv.half


def test_single_value_has_no_interval_and_bad_input_is_refused() -> None:
    one = S.t_interval([3.5])
    assert one.mean == 3.5 and one.n == 1 and math.isnan(one.half)
    assert one.text() == "3.5000 (1 seed)"
    two = S.t_interval([3.0, 3.2])  # computed, but under MIN_SEEDS: shown without it
    assert (
        two.text() == "3.1000 (2 seeds)"
        and S.verdict(S.paired({0: 1, 1: 2}, {0: 0, 1: 0})) == "n/a"
    )
    with pytest.raises(ValueError, match="at least one"):
        S.t_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        S.t_interval([1.0, float("nan")])


def test_paired_uses_per_seed_differences_on_shared_seeds_only() -> None:
    # Seed noise moves both methods together (1, 2, 4 vs 0.5, 1, 2.5): per-seed differences
    # 0.5, 1.0, 1.5 (mean 1, sd 0.5) are far tighter than either method's own spread.
    a = {0: 1.0, 1: 2.0, 2: 4.0, 7: 9.0}  # seed 7: a only, left out
    b = {0: 0.5, 1: 1.0, 2: 2.5, 5: 0.0}  # seed 5: b only, left out
    d = S.paired(a, b)
    assert d.n == 3 and d.mean == pytest.approx(1.0)
    assert d.half == pytest.approx(T_975[2] * 0.5 / math.sqrt(3), abs=1e-4)  # 1.2421
    assert S.verdict(d) == "tie"  # 1.0 − 1.2421 < 0 < 1.0 + 1.2421
    assert S.paired(a, {3: 1.0}) is None


def test_verdict_tie_rule_and_direction() -> None:
    # Differences 1.0, 1.1, 0.9: mean 1.0, half-width 4.3027·0.1/√3 = 0.2484 -> [0.75, 1.25].
    worse = S.paired({0: 2.0, 1: 2.1, 2: 1.9}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert worse.half == pytest.approx(0.2484, abs=1e-4)
    assert S.verdict(worse) == "worse"  # a higher loss than the reference
    assert S.verdict(worse, lower_is_better=False) == "better"  # e.g. an accuracy
    better = S.paired({0: 1.0, 1: 1.0, 2: 1.0}, {0: 2.0, 1: 2.1, 2: 1.9})
    assert S.verdict(better) == "better" and better.text(signed=True) == "-1.0000 ± 0.2484"
    # An interval that touches 0 is still a tie; one seed or none is no verdict.
    touching = S.Interval(mean=0.5, half=0.5, n=3)
    assert S.verdict(touching) == "tie"
    assert S.verdict(S.Interval(1.0, math.nan, 1)) == "n/a" and S.verdict(None) == "n/a"


def test_a_sure_but_negligible_difference_is_the_same() -> None:
    # 3e-5 ± 1e-5 excludes 0 (worse), but its far end 4e-5 is under a 1e-3 margin: same.
    tiny = S.Interval(mean=3e-5, half=1e-5, n=3)
    assert S.verdict(tiny) == "worse" and S.verdict(tiny, negligible=1e-3) == "same"
    # The margin needs the whole interval inside it: 5e-4 ± 6e-4 reaches 1.1e-3, a tie.
    assert S.verdict(S.Interval(mean=5e-4, half=6e-4, n=3), negligible=1e-3) == "tie"
    assert S.verdict(S.Interval(mean=-0.02, half=0.001, n=3), negligible=1e-3) == "better"


def _row(method: str, seed: int, own: float, test: float, semantics: str = "adapter") -> dict:
    return {
        "method": method, "regime": "domain", "seed": seed, "semantics": semantics,
        "personal": [5.0, own + 0.1, own], "test": [5.0, test + 0.1, test], "clients": {},
        "mb_moved": 1.0, "seconds": 10.0, "load": 0.5, "threads": 1, "data_seed_fixed": False,
    }  # fmt: skip


def test_report_pairs_each_method_with_fedit_and_local_only(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        from _quality_report import write_report
    finally:
        sys.path.pop(0)
    rows = []
    for s, noise in enumerate([0.0, 0.3, -0.2]):  # seed noise shared by every method
        rows += [
            _row("fedit", s, 3.5 + noise, 3.9 + noise),
            _row("local only", s, 3.4 + noise, 4.2 + noise, "reference"),
            # squeeze: own − fedit = −0.1, −0.11, −0.09 (better); test − local only = −0.3
            _row("squeeze", s, 3.4 - 0.01 * (s % 2) + 0.01 * (s == 2) + noise, 3.9 + noise),
            _row("fedsa", s, 3.3 + noise, 5.0, "A only, B local"),
        ]
    paths = write_report(
        rows, stem="q", results=tmp_path, regimes={"domain": "4 clients"},
        common=["a=1"], regime_overrides={"domain": ["b=2"]}, pairs=[("squeeze", "fedit")],
        invocation="python bench/quality.py",
    )  # fmt: skip
    assert [p.name for p in paths] == ["q.md", "q.png", "q-rows.jsonl", "q-rows.csv"]
    md = (tmp_path / "q.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| squeeze | -"))
    # own − fedit: −0.1000 ± t(2)·0.01/√3 = 0.0248 -> better; own − local only: 0.0 ± 0.0248 tie
    assert "-0.1000 ± 0.0248 better" in line and "+0.0000 ± 0.0248 tie" in line
    assert "+0.0000 ± 0.0000" in line and "-0.3000 ± 0.0000 better" in line
    fedsa = next(x for x in md.splitlines() if x.startswith("| fedsa | A only"))
    assert "n/a (B on clients)" in fedsa  # the server's adapter is not what fedsa clients use
    assert "| squeeze − fedit | -0.1000 ± 0.0248 better |" in md
    assert len((tmp_path / "q-rows.csv").read_text().splitlines()) == 1 + 12 * 3
    assert "| 10† |" not in md  # every cell started at load 0.5: no mark


def test_a_cell_started_on_a_busy_machine_marks_its_wall_time(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        from _quality_report import BUSY_LOAD, write_report
    finally:
        sys.path.pop(0)
    rows = [_row("fedit", s, 3.5, 3.9) for s in range(3)] + [
        _row("svd", s, 3.4, 3.8) for s in range(3)
    ]
    rows[4]["load"] = BUSY_LOAD + 0.1  # svd seed 1 shared the cores with another job
    write_report(
        rows, stem="q", results=tmp_path, regimes={"domain": "4 clients"}, common=["a=1"],
        regime_overrides={"domain": ["b=2"]}, pairs=[], invocation="python bench/quality.py",
    )  # fmt: skip
    md = (tmp_path / "q.md").read_text()
    svd = next(x for x in md.splitlines() if x.startswith("| svd | adapter"))
    fedit = next(x for x in md.splitlines() if x.startswith("| fedit | adapter"))
    assert "| 10† |" in svd and "| 10 |" in fedit and "†: a seed's cell started" in md


def test_local_only_at_its_best_round_is_the_harder_reference(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        from _quality_report import best_round, write_report
    finally:
        sys.path.pop(0)
    rows = []
    for s, noise in enumerate([0.0, 0.3, -0.2]):
        local = _row("local only", s, 3.4 + noise, 4.2 + noise, "reference")
        local["personal"] = [5.0, 3.3 + noise, 3.4 + noise]  # over-fits: best at round 1
        rows += [local, _row("fedit", s, 3.35 + noise + 0.01 * (s - 1), 3.9 + noise)]
    # round 0 (the base model) is never a stopping point, even when it is the lowest
    assert best_round({0: {"personal": [1.0, 3.3, 3.4]}}) == {0: 3.3}
    write_report(
        rows, stem="q", results=tmp_path, regimes={"domain": "4 clients"}, common=["a=1"],
        regime_overrides={"domain": ["b=2"]}, pairs=[], invocation="python bench/quality.py",
    )  # fmt: skip
    md = (tmp_path / "q.md").read_text()
    assert "| own − local only at its best round |" in md
    line = next(x for x in md.splitlines() if x.startswith("| fedit | — |"))
    cells = [c.strip() for c in line.split("|")[2:-1]]
    # by hand: fedit − final = −0.06, −0.05, −0.04: −0.0500 ± 4.303·0.01/√3 = 0.0248, better;
    # fedit − best round = +0.04, +0.05, +0.06: +0.0500 ± 0.0248, worse: early stopping flips it
    assert cells[1:3] == ["-0.0500 ± 0.0248 better", "+0.0500 ± 0.0248 worse"]


def test_a_difference_on_fewer_seeds_than_its_methods_have_says_how_many() -> None:
    from _quality_report import diff_text

    three, two = {0: 3.10, 1: 3.20, 2: 3.90}, {0: 3.15, 1: 3.24}
    # by hand: differences -0.05, -0.04: mean -0.045; two seeds are under MIN_SEEDS (3): no
    # interval (t(0.975, 1) = 12.706 would rest on one degree of freedom) and no verdict
    assert diff_text(three, two) == "-0.0450 (2 seeds) n/a"
    assert diff_text(three, {0: 3.0, 1: 3.1, 2: 3.8}).endswith("worse")  # 3 of 3: no count
    four = {**three, 3: 3.5}
    # differences 0.1, 0.1, 0.1 on the 3 shared seeds of 4: a verdict, and how many it rests on
    assert diff_text(four, {0: 3.0, 1: 3.1, 2: 3.8}) == "+0.1000 ± 0.0000 worse (3 seeds)"
    assert diff_text(three, {5: 3.0}) == "—"


def test_a_question_across_regimes_pools_their_seeds() -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        from _quality_report import pooled_tables
    finally:
        sys.path.pop(0)
    rows = []
    # quickstart seeds 0-2: "a lr 1" − "b lr 1" = +0.01, +0.02, +0.03; scarce-lr seeds 1-3 (the
    # same seed numbers in another regime are other runs): "a" − "b" = +0.02 on each
    for s, d in zip((0, 1, 2), (0.01, 0.02, 0.03), strict=True):
        rows += [{**_row("a lr 1", s, 3.0 + d, 3.5), "regime": "quickstart"}]
        rows += [{**_row("b lr 1", s, 3.0, 3.5 + s), "regime": "quickstart"}]
    for s in (1, 2, 3):
        rows += [{**_row("a", s, 3.12 + s, 3.0), "regime": "scarce-lr"}]
        rows += [{**_row("b", s, 3.1 + s, 3.0), "regime": "scarce-lr"}]
    # a regime that has not run yet ("long") is left out of the question, not the question
    parts = [("a lr 1", "b lr 1", "quickstart"), ("a", "b", "scarce-lr"), ("a", "b", "long")]
    lines = pooled_tables(rows, {"a − b": parts, "missing": [("a", "c", "scarce-lr")]})
    line = next(x for x in lines if x.startswith("| a − b |"))
    assert "in `long`" not in line and "a − b in `scarce-lr` |" in line
    # by hand, six differences 0.01, 0.02, 0.03, 0.02, 0.02, 0.02: mean 0.02, s = √(0.0002/5),
    # half = t(0.975, 5) · s/√6 = 2.5706 · 0.0025820 = 0.0066 (a regime alone: 3 terms, wider)
    assert "| +0.0200 ± 0.0066 worse |" in line and "| 0 of 6 |" in line
    # the test set: quickstart 0, −1, −2 and scarce-lr 0, 0, 0 -> mean −0.5
    assert "| -0.5000 ± " in line
    assert not any(x.startswith("| missing") for x in lines)  # no cell for "c": not shown
    assert pooled_tables(rows, {"missing": [("a", "c", "scarce-lr")]}) == []
