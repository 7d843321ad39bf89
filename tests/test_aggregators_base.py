"""Factors, Aggregate, weight normalisation and option rejection (registry: its own file)."""

from __future__ import annotations

import math

import pytest
import torch

from fedllm.aggregators import Aggregate, Factors, available, base, get


@pytest.fixture(autouse=True)
def discovered() -> None:
    """Discover the built-in methods before a test swaps the registry for its own dict."""
    available()


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_factors_rejects_non_2d_with_shapes_in_message() -> None:
    with pytest.raises(ValueError, match=r"B \(3,\) and A \(1, 4\)"):
        Factors(torch.zeros(3), torch.zeros(1, 4), 1.0)


def test_factors_rejects_rank_mismatch_naming_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"B \(3, 2\).*A \(3, 4\)"):
        Factors(torch.zeros(3, 2), torch.zeros(3, 4), 1.0)


@pytest.mark.parametrize("scaling", [0.0, -1.0, math.inf, math.nan])
def test_factors_rejects_bad_scaling(scaling: float) -> None:
    with pytest.raises(ValueError, match="scaling"):
        Factors(torch.zeros(3, 2), torch.zeros(2, 4), scaling)


def test_factors_rejects_mixed_dtypes() -> None:
    with pytest.raises(ValueError, match="dtype"):
        Factors(torch.zeros(3, 2), torch.zeros(2, 4, dtype=torch.float64), 1.0)


def test_rank_shape_and_delta() -> None:
    f = Factors(t([[1.0], [2.0]]), t([[3.0, 4.0, 5.0]]), 0.5)
    assert f.rank == 1
    assert f.shape == (2, 3)
    # 0.5 * [1, 2]ᵀ [3, 4, 5]
    expected = t([[1.5, 2.0, 2.5], [3.0, 4.0, 5.0]])
    assert f.delta().dtype == torch.float64
    assert torch.equal(f.delta(), expected)


def test_truncate_keeps_the_kept_parts_delta_under_a_new_scaling() -> None:
    f = Factors(t([[1.0, 2.0], [3.0, 4.0]]), t([[5.0, 6.0], [7.0, 8.0]]), 2.0)
    head = f.truncate(1, 4.0)
    # B rescaled by 2/4: [[0.5], [1.5]].
    # ΔW of the kept part: 2·[1, 3]ᵀ[5, 6] = [[10, 12], [30, 36]].
    assert torch.equal(head.B, t([[0.5], [1.5]]))
    assert torch.equal(head.A, t([[5.0, 6.0]]))
    assert head.scaling == 4.0
    assert torch.equal(head.delta(), t([[10.0, 12.0], [30.0, 36.0]]))


def test_truncate_above_rank_zero_pads_and_keeps_delta() -> None:
    f = Factors(t([[1.0, 2.0], [3.0, 4.0]]), t([[5.0, 6.0], [7.0, 8.0]]), 2.0)
    big = f.truncate(3)
    assert big.rank == 3 and big.scaling == 2.0
    assert torch.equal(big.B[:, 2], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(big.A[2], torch.zeros(2, dtype=torch.float64))
    # 2·B@A = 2·[[19, 22], [43, 50]]
    assert torch.equal(big.delta(), t([[38.0, 44.0], [86.0, 100.0]]))


def test_truncate_and_pad_never_alias_or_mutate_the_input() -> None:
    f = Factors(t([[1.0, 2.0]]), t([[3.0], [4.0]]), 1.0)
    for g in (f.truncate(2), f.truncate(1), f.pad(2), f.pad(4)):
        g.B.add_(100.0)
        g.A.add_(100.0)
    assert torch.equal(f.B, t([[1.0, 2.0]])) and torch.equal(f.A, t([[3.0], [4.0]]))


def test_pad_refuses_to_shrink() -> None:
    with pytest.raises(ValueError, match="truncate"):
        Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0).pad(1)


def test_aggregate_state_defaults_to_a_fresh_empty_dict() -> None:
    f = Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)
    a, b = Aggregate(f), Aggregate(f)
    assert a.state == {} and a.state is not b.state


def test_normalized_weights_sum_to_one() -> None:
    f = Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)
    assert base.normalized_weights([f, f], [1, 3]) == [0.25, 0.75]


@pytest.mark.parametrize(
    ("weights", "message"),
    [([1.0, -1.0], "non-negative"), ([0.0, 0.0], "all be zero"), ([1.0], "2 updates but 1")],
)
def test_normalized_weights_rejects(weights: list[float], message: str) -> None:
    f = Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match=message):
        base.normalized_weights([f, f], weights)


def test_normalized_weights_rejects_mixed_module_shapes() -> None:
    f = Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)
    g = Factors(torch.zeros(3, 2), torch.zeros(2, 5), 1.0)
    with pytest.raises(ValueError, match="module shape"):
        base.normalized_weights([f, g], [1.0, 1.0])


def test_reject_options_names_them() -> None:
    with pytest.raises(TypeError, match=r"\['metod'\]"):
        get("fedit")([Factors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)], [1.0], metod="exact")
