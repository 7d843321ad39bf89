"""fedllm.eval.exposure: rank-based exposure vs hand-computed cases; skew-normal extrapolation."""

import math

import numpy as np
import pytest

from fedllm.eval import exposure, exposure_skewnormal


def test_canary_better_than_all_references_gets_log2_n_plus_one() -> None:
    refs = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0]  # n = 8, |R| = 9 with the canary
    assert exposure(5.0, refs) == pytest.approx(math.log2(9))  # rank 1: log2 9 - log2 1


def test_rank_counts_strictly_lower_references() -> None:
    refs = [1.0, 2.0, 3.0, 4.0]  # n = 4
    # two references below 2.5 -> rank 3 -> log2 5 - log2 3
    assert exposure(2.5, refs) == pytest.approx(math.log2(5) - math.log2(3))


def test_ties_do_not_count_against_the_canary() -> None:
    refs = [3.0, 3.0, 3.0, 5.0]
    assert exposure(3.0, refs) == pytest.approx(math.log2(5))  # none strictly lower -> rank 1
    assert exposure(5.0, refs) == pytest.approx(math.log2(5) - 2.0)  # three lower -> rank 4


def test_worst_case_is_zero_the_canary_being_one_of_the_candidates() -> None:
    refs = [1.0, 2.0, 3.0, 4.0]  # all four below: rank 5 of |R| = 5 (Carlini et al.: >= 0)
    assert exposure(9.0, refs) == 0.0


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        exposure(1.0, [])
    with pytest.raises(ValueError, match="finite"):
        exposure(float("nan"), [1.0])


def test_skewnormal_median_canary_has_about_one_bit() -> None:
    refs = np.random.default_rng(0).normal(100.0, 5.0, size=4000)
    # half of the references lie below the median: -log2(0.5) = 1 bit
    assert exposure_skewnormal(float(np.median(refs)), refs) == pytest.approx(1.0, abs=0.1)


def test_skewnormal_extrapolates_beyond_log2_n_and_is_capped() -> None:
    refs = np.random.default_rng(1).normal(100.0, 5.0, size=200)
    far = 100.0 - 8 * 5.0  # 8 sigma below: CDF ~ 6e-16, about 50 bits
    assert exposure(far, refs) == pytest.approx(math.log2(201))
    assert exposure_skewnormal(far, refs) > 30
    assert exposure_skewnormal(far, refs, space_size=1e9) == pytest.approx(math.log2(1e9))
