"""Server-side screening of client updates (fedllm.aggregators.screen), on hand-computed factors."""

from __future__ import annotations

import math

import pytest
import torch

from fedllm.aggregators import Factors
from fedllm.aggregators.screen import check_update, screen, update_norm

SHAPES = {"q": (3, 2), "v": (3, 2)}


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def ok(rank: int = 1, value: float = 1.0) -> Factors:
    """A well-formed (3, 2) update of `rank` whose entries are all `value`."""
    return Factors(torch.full((3, rank), value), torch.ones(rank, 2), 1.0)


def scalar(norm: float) -> dict[str, Factors]:
    """A one-module (1×1) update whose norm is exactly `norm`."""
    return {"m": Factors(t([[norm]]), t([[1.0]]), 1.0)}


# -- update_norm ----------------------------------------------------------------------------------


def test_update_norm_of_a_rank_one_update_by_hand() -> None:
    # B@A = [1, 2]ᵀ[2, 0, 1] = [[2, 0, 1], [4, 0, 2]]: ‖·‖² = 4 + 1 + 16 + 4 = 25, times s = 0.5
    f = Factors(t([[1.0], [2.0]]), t([[2.0, 0.0, 1.0]]), 0.5)
    assert update_norm(f) == pytest.approx(2.5, abs=1e-12)


def test_update_norm_of_a_rank_two_update_with_cross_terms_by_hand() -> None:
    # B@A = [[1, 2], [3, 4], [4, 6]]: ‖·‖² = 1 + 4 + 9 + 16 + 16 + 36 = 82, times s = 2
    f = Factors(t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), t([[1.0, 2.0], [3.0, 4.0]]), 2.0)
    assert update_norm(f) == pytest.approx(2 * math.sqrt(82), abs=1e-12)


def test_update_norm_matches_the_dense_frobenius_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    for rank in (1, 3, 8):
        f = Factors(
            torch.randn(12, rank, generator=gen), torch.randn(rank, 7, generator=gen), 16 / rank
        )
        dense = torch.linalg.matrix_norm(f.delta()).item()
        assert update_norm(f) == pytest.approx(dense, rel=1e-6)


def test_update_norm_of_zero_factors_is_zero() -> None:
    assert update_norm(Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)) == 0.0


# -- check_update ---------------------------------------------------------------------------------


def test_check_update_accepts_a_well_formed_update() -> None:
    assert check_update({"q": ok(2), "v": ok(1)}, shapes=SHAPES, max_rank=2) is None


def test_check_update_accepts_shapes_given_as_lists() -> None:
    assert check_update({"q": ok()}, shapes={"q": [3, 2]}, max_rank=1) is None  # type: ignore[dict-item]


def test_check_update_names_a_missing_module() -> None:
    assert check_update({"q": ok()}, shapes=SHAPES, max_rank=2) == "missing modules ['v']"


def test_check_update_shortens_a_long_list_of_missing_modules() -> None:
    shapes = {name: (3, 2) for name in "abcde"}
    assert check_update({}, shapes=shapes, max_rank=2) == "missing modules ['a', 'b', 'c'] …"


def test_check_update_names_an_unknown_module() -> None:
    update = {"q": ok(), "v": ok(), "k": ok()}
    assert check_update(update, shapes=SHAPES, max_rank=2) == "unknown modules ['k']"


def test_check_update_reports_missing_before_unknown() -> None:
    assert check_update({"q": ok(), "k": ok()}, shapes=SHAPES, max_rank=2) == (
        "missing modules ['v']"
    )


def test_check_update_names_a_wrong_shape() -> None:
    wrong = Factors(torch.ones(3, 1), torch.ones(1, 5), 1.0)
    reason = check_update({"q": ok(), "v": wrong}, shapes=SHAPES, max_rank=2)
    assert reason == "v: update shape (3, 5), expected (3, 2)"


def test_check_update_names_a_rank_above_the_maximum() -> None:
    reason = check_update({"q": ok(3), "v": ok()}, shapes=SHAPES, max_rank=2)
    assert reason == "q: rank 3 above the allowed 2"
    assert check_update({"q": ok(2), "v": ok(2)}, shapes=SHAPES, max_rank=2) is None  # at the max


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["A", "B"])
def test_check_update_names_nan_or_inf(bad: float, where: str) -> None:
    B, A = torch.ones(3, 1), torch.ones(1, 2)
    (A if where == "A" else B)[0, 0] = bad
    reason = check_update({"q": ok(), "v": Factors(B, A, 1.0)}, shapes=SHAPES, max_rank=2)
    assert reason == "v: NaN or Inf in the factors"


# -- screen ---------------------------------------------------------------------------------------


def test_screen_needs_three_clients_for_the_norm_rule() -> None:
    # norms 1 and 1000: far apart, but two clients have no trustworthy median
    accepted, rejected = screen(
        {"a": scalar(1.0), "b": scalar(1000.0)}, shapes={"m": (1, 1)}, max_rank=1
    )
    assert accepted == ["a", "b"] and rejected == {}


def test_screen_keeps_a_norm_exactly_at_the_ratio_and_rejects_one_over_it() -> None:
    shapes = {"m": (1, 1)}
    # norms 1, 2, 20: median 2, and 20 = 10 × 2 exactly, so it stays
    at = {"a": scalar(1.0), "b": scalar(2.0), "c": scalar(20.0)}
    assert screen(at, shapes=shapes, max_rank=1, max_norm_ratio=10.0) == (["a", "b", "c"], {})
    # 20.5 > 10 × 2
    over = {"a": scalar(1.0), "b": scalar(2.0), "c": scalar(20.5)}
    accepted, rejected = screen(over, shapes=shapes, max_rank=1, max_norm_ratio=10.0)
    assert accepted == ["a", "b"]
    assert rejected == {"c": "update norm 20.5 is over 10× the median 2"}
    # the median is client b's norm: a private run's reason leaves it out
    _, private = screen(over, shapes=shapes, max_rank=1, max_norm_ratio=10.0, quote_median=False)
    assert private == {"c": "update norm 20.5 is over 10× the round's median"}


def test_screen_uses_the_total_norm_over_modules() -> None:
    shapes = {"q": (1, 1), "v": (1, 1)}

    def two(q: float, v: float) -> dict[str, Factors]:
        return {"q": scalar(q)["m"], "v": scalar(v)["m"]}

    # totals √(3² + 4²) = 5, √(0 + 1) = 1, √(1 + 0) = 1: median 1
    updates = {"a": two(3.0, 4.0), "b": two(0.0, 1.0), "c": two(1.0, 0.0)}
    assert screen(updates, shapes=shapes, max_rank=1, max_norm_ratio=5.0)[1] == {}
    accepted, rejected = screen(updates, shapes=shapes, max_rank=1, max_norm_ratio=4.9)
    assert accepted == ["b", "c"] and list(rejected) == ["a"]


def test_screen_rejects_factors_rescaled_apart_though_their_product_is_honest() -> None:
    """B·c with A/c leaves ΔW alone, and a factor-wise mean (fedit) takes the factors apart:
    each factor's norm is screened against its own median."""
    shapes = {"m": (1, 1)}
    gauge = {"m": Factors(t([[1.5e4]]), t([[1e-4]]), 1.0)}  # ΔW 1.5: inside 100× the median
    updates = {"a": scalar(1.0), "b": scalar(2.0), "c": gauge}
    assert update_norm(gauge["m"]) == pytest.approx(1.5)
    # ‖s·B‖: 1, 2, 15000 -> median 2
    assert screen(updates, shapes=shapes, max_rank=1)[1] == {
        "c": "‖s·B‖ 1.5e+04 is over 100× the median 2"
    }
    # the scaling counts on B's side: s = 0.01 brings s·B to 150, under 100 × 2
    small = {"m": Factors(t([[1.5e4]]), t([[1e-4]]), 0.01)}
    assert screen({**updates, "c": small}, shapes=shapes, max_rank=1)[1] == {}
    # A up, B down: ‖A‖/√r 1, 1, 10000 -> median 1
    flipped = {"m": Factors(t([[1e-4]]), t([[1e4]]), 1.0)}
    assert screen({**updates, "c": flipped}, shapes=shapes, max_rank=1)[1] == {
        "c": "‖A‖/√r 1e+04 is over 100× the median 1"
    }


def test_an_honest_higher_rank_is_not_an_a_norm_outlier() -> None:
    """‖A‖_F grows as √r with rows of one norm: a rank-64 A of unit rows beside rank-4 ones is
    ‖A‖ = 8 against 2 (4× the median, rejected at a ratio of 3 unnormalised), but 1 per √r."""
    shapes = {"m": (64, 64)}

    def unit_rows(rank: int) -> dict[str, Factors]:
        A = torch.eye(64, dtype=torch.float64)[:rank]
        return {"m": Factors(torch.full((64, rank), 0.01, dtype=torch.float64), A, 1.0 / rank)}

    updates = {"a": unit_rows(4), "b": unit_rows(4), "c": unit_rows(4), "d": unit_rows(64)}
    assert screen(updates, shapes=shapes, max_rank=64, max_norm_ratio=3.0) == (list(updates), {})


def test_screen_takes_the_median_over_well_formed_clients_only() -> None:
    shapes = {"m": (1, 1)}
    broken = {"m": Factors(t([[math.nan]]), t([[1.0]]), 1.0)}
    # two well-formed clients are too few for the norm rule, whatever the broken one holds
    accepted, rejected = screen(
        {"a": scalar(1.0), "x": broken, "b": scalar(1000.0)}, shapes=shapes, max_rank=1
    )
    assert accepted == ["a", "b"] and rejected == {"x": "m: NaN or Inf in the factors"}
    # with three well-formed ones the median is theirs (2), not shifted by the malformed reply
    updates = {"a": scalar(1.0), "x": broken, "b": scalar(2.0), "c": scalar(201.0)}
    accepted, rejected = screen(updates, shapes=shapes, max_rank=1)
    assert accepted == ["a", "b"]
    assert set(rejected) == {"x", "c"} and "median 2" in rejected["c"]


def test_screen_rejects_malformed_clients_with_their_reason_and_keeps_input_order() -> None:
    shapes = {"m": (1, 1)}
    too_big = {"m": Factors(torch.ones(1, 2), torch.ones(2, 1), 1.0)}
    updates = {"c": scalar(1.0), "z": {}, "a": scalar(1.0), "r": too_big, "b": scalar(1.0)}
    accepted, rejected = screen(updates, shapes=shapes, max_rank=1)
    assert accepted == ["c", "a", "b"]
    assert rejected == {"z": "missing modules ['m']", "r": "m: rank 2 above the allowed 1"}


def test_screen_does_not_apply_the_norm_rule_to_a_zero_median() -> None:
    # norms 0, 0, 5: the median is 0, and no ratio of it is meaningful
    updates = {"a": scalar(0.0), "b": scalar(0.0), "c": scalar(5.0)}
    assert screen(updates, shapes={"m": (1, 1)}, max_rank=1) == (["a", "b", "c"], {})


def test_screening_never_mutates_its_inputs() -> None:
    gen = torch.Generator().manual_seed(1)

    def rand(rank: int) -> Factors:
        return Factors(
            torch.randn(3, rank, generator=gen), torch.randn(rank, 2, generator=gen), 2.0
        )

    nan = rand(1)
    nan.A[0, 1] = math.nan
    updates = {
        "a": {"q": rand(1), "v": rand(2)},
        "b": {"q": rand(2), "v": rand(1)},
        "c": {"q": rand(1), "v": rand(1)},
        "d": {"q": nan, "v": rand(1)},
        "e": {"q": Factors(100 * torch.ones(3, 2), 100 * torch.ones(2, 2), 2.0), "v": rand(1)},
    }
    before = {
        c: {m: (f.B.clone(), f.A.clone(), f.scaling) for m, f in u.items()}
        for c, u in updates.items()
    }
    shapes = {"q": (3, 2), "v": (3, 2)}
    frozen_shapes = dict(shapes)
    accepted, rejected = screen(updates, shapes=shapes, max_rank=2, max_norm_ratio=10.0)
    assert accepted == ["a", "b", "c"] and set(rejected) == {"d", "e"}
    assert shapes == frozen_shapes and list(updates) == ["a", "b", "c", "d", "e"]
    for c, u in updates.items():
        assert list(u) == list(before[c])
        for m, f in u.items():
            B, A, s = before[c][m]
            assert torch.equal(f.B, B) and f.scaling == s
            assert torch.allclose(f.A, A, equal_nan=True)
