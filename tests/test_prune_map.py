"""Kept-index maps: pruned factors back at full shape, and coverage-weighted aggregation."""

import pytest
import torch

from fedllm.aggregators import Factors, get
from fedllm.constrained.prune_map import (
    Kept,
    check_kept,
    coverage_weighted,
    expand,
    fit_start,
    kept_from_record,
    kept_to_record,
    restrict,
    uncovered_fill,
)


def rand(d: int, r: int, k: int, seed: int, scaling: float = 2.0) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return Factors(torch.randn(d, r, generator=g), torch.randn(r, k, generator=g), scaling)


def test_expanded_rows_land_exactly_at_the_kept_ids() -> None:
    f = rand(2, 3, 4, 0)
    full = expand(f, Kept(out=torch.tensor([1, 4]), in_=None), shape=(5, 4))
    assert full.shape == (5, 4)
    assert torch.equal(full.B[1], f.B[0]) and torch.equal(full.B[4], f.B[1])
    assert torch.equal(full.B[[0, 2, 3]], torch.zeros(3, 3))
    delta = full.delta()
    assert torch.equal(delta[[1, 4]], f.delta())
    assert torch.count_nonzero(delta[[0, 2, 3]]) == 0


def test_expanded_columns_and_restrict_round_trip() -> None:
    f = rand(3, 2, 2, 1)
    kept = Kept(out=None, in_=torch.tensor([0, 3]))
    full = expand(f, kept, shape=(3, 5))
    assert torch.equal(full.A[:, [0, 3]], f.A)
    assert torch.count_nonzero(full.A[:, [1, 2, 4]]) == 0
    back = restrict(full, kept)
    assert torch.equal(back.A, f.A) and torch.equal(back.B, f.B)


def test_mixed_pruned_and_whole_clients_aggregate_per_coordinate() -> None:
    """Client 0 (weight 1) covers all 4 rows; client 1 (weight 3) only rows 0 and 2."""
    whole, pruned = rand(4, 2, 3, 2), rand(2, 1, 3, 3, scaling=4.0)
    kept = Kept(out=torch.tensor([0, 2]), in_=None)
    shapes = {"m": (4, 3)}
    inputs = coverage_weighted(
        [{"m": whole}, {"m": pruned}], [{}, {"m": kept}], weights=[1.0, 3.0], shapes=shapes
    )
    result = get("svd")([u["m"] for u in inputs], [1.0, 3.0]).global_.delta()
    d0, d1 = whole.delta(), pruned.delta()
    expected = d0.clone()
    expected[0] = (1 * d0[0] + 3 * d1[0]) / 4
    expected[2] = (1 * d0[2] + 3 * d1[1]) / 4  # rows 1 and 3: client 0 alone
    assert torch.allclose(result, expected, atol=1e-5)


def test_coverage_on_columns_and_uncovered_coordinates_stay_zero() -> None:
    a, b = rand(2, 1, 2, 4), rand(2, 1, 1, 5)
    ka, kb = Kept(None, torch.tensor([0, 1])), Kept(None, torch.tensor([1]))
    inputs = coverage_weighted(
        [{"m": a}, {"m": b}], [{"m": ka}, {"m": kb}], weights=[1, 1], shapes={"m": (2, 3)}
    )
    result = get("svd")([u["m"] for u in inputs], [1, 1]).global_.delta()
    expected = torch.zeros(2, 3, dtype=torch.float64)
    expected[:, 0] = a.delta()[:, 0]
    expected[:, 1] = (a.delta()[:, 1] + b.delta()[:, 0]) / 2
    assert torch.allclose(result, expected, atol=1e-5)


def _aggregate(name, updates, kept, weights, global_, shapes):
    fill = uncovered_fill(updates, kept, weights=weights, global_=global_)
    if fill is not None:
        updates, kept, weights = [*updates, fill[0]], [*kept, fill[1]], [*weights, fill[2]]
    inputs = coverage_weighted(updates, kept, weights=weights, shapes=shapes)
    return {m: get(name)([u[m] for u in inputs], weights).global_.delta() for m in shapes}


@pytest.mark.parametrize("method", ["svd", "flexlora"])
def test_rows_no_reply_covers_keep_the_globals_value(method: str) -> None:
    # h97: a round answered only by pruned clients set those rows of the global to zero
    g_q, g_v = rand(4, 2, 3, 6, scaling=1.0), rand(3, 2, 3, 7, scaling=1.0)
    shapes = {"q": (4, 3), "v": (3, 3)}
    pruned, whole_v = rand(2, 1, 3, 8), rand(3, 1, 3, 9)
    kept = [{"q": Kept(torch.tensor([0, 2]), None)}]
    got = _aggregate(
        method, [{"q": pruned, "v": whole_v}], kept, [5.0], {"q": g_q, "v": g_v}, shapes
    )
    expected = g_q.delta().double().clone()
    expected[[0, 2]] = pruned.delta().double()  # covered: the client's; rows 1, 3: the global's
    assert torch.allclose(got["q"], expected, atol=1e-5)
    assert torch.allclose(got["v"], whole_v.delta().double(), atol=1e-5)  # untouched module


def test_the_fill_does_not_grow_svds_rank_round_after_round() -> None:
    # the fill re-adds the global (rank R) every round, and a no-gap module gets a zero B of
    # the clients' width: svd's default rank was Σrᵢ + R, so R grew by Σrᵢ each round
    shapes = {"q": (40, 30), "v": (30, 30)}
    g = {"q": rand(40, 2, 30, 20, scaling=1.0), "v": rand(30, 2, 30, 21, scaling=1.0)}
    kept = [{"q": Kept(torch.arange(0, 40, 2), None)}, {"q": Kept(torch.arange(0, 20), None)}]
    for rnd in range(4):
        updates = [
            {"q": rand(20, 2, 30, 30 + rnd), "v": rand(30, 2, 30, 40 + rnd)},
            {"q": rand(20, 2, 30, 50 + rnd), "v": rand(30, 2, 30, 60 + rnd)},
        ]
        fill = uncovered_fill(updates, kept, weights=[1.0, 1.0], global_=g)
        weights = [1.0, 1.0, fill[2]]
        inputs = coverage_weighted(
            [*updates, fill[0]], [*kept, fill[1]], weights=weights, shapes=shapes
        )
        g = {m: get("svd")([u[m] for u in inputs], weights).global_ for m in shapes}
        assert g["v"].rank == 4, rnd  # two rank-2 clients, and the fill's zero B
        # q: rows 21, 23, .., 39 keep the first global's (rank 2) every round, the rest are the
        # clients' (2 + 2); before: 6, 10, 14, 18
        assert g["q"].rank == 6, rnd


def test_columns_no_reply_covers_keep_the_globals_value() -> None:
    g = rand(2, 2, 3, 10, scaling=1.0)
    a, b = rand(2, 1, 2, 11), rand(2, 1, 1, 12)
    kept = [{"m": Kept(None, torch.tensor([0, 1]))}, {"m": Kept(None, torch.tensor([1]))}]
    got = _aggregate("svd", [{"m": a}, {"m": b}], kept, [1.0, 1.0], {"m": g}, {"m": (2, 3)})
    expected = g.delta().double().clone()
    expected[:, 0] = a.delta()[:, 0]
    expected[:, 1] = (a.delta()[:, 1] + b.delta()[:, 0]) / 2
    assert torch.allclose(got["m"], expected, atol=1e-5)


def test_no_fill_when_every_coordinate_is_covered() -> None:
    whole, pruned = rand(4, 2, 3, 2), rand(2, 1, 3, 3)
    kept = [{}, {"m": Kept(torch.tensor([0, 2]), None)}]
    assert (
        uncovered_fill(
            [{"m": whole}, {"m": pruned}], kept, weights=[1.0, 3.0], global_={"m": whole}
        )
        is None
    )


def test_a_factor_wise_mean_barely_moves_with_the_fill() -> None:
    # fedit averages A: the fill's weight is 1e-3 of the clients', its A the clients' mean
    g = rand(4, 2, 3, 13, scaling=1.0)
    pruned = rand(2, 2, 3, 14, scaling=1.0)
    kept = [{"m": Kept(torch.tensor([0, 2]), None)}]
    got = _aggregate("fedit", [{"m": pruned}], kept, [1.0], {"m": g}, {"m": (4, 3)})["m"]
    assert torch.allclose(got[[0, 2]], pruned.delta().double(), rtol=0.01, atol=0.02)
    assert torch.count_nonzero(got[[1, 3]]) > 0  # before: exactly zero


def test_fit_start_restricts_full_factors_and_passes_restricted_ones() -> None:
    g = rand(4, 3, 2, 6, scaling=1.0)
    kept = {"m": Kept(torch.tensor([1, 3]), None)}
    a = fit_start({"m": g}, kept, rank=2, scaling=0.5)["m"]
    b = fit_start({"m": restrict(g, kept["m"])}, kept, rank=2, scaling=0.5)["m"]
    assert a.shape == (2, 2) and a.rank == 2
    assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)
    assert torch.allclose(a.delta(), g.truncate(2).delta()[[1, 3]])


def test_kept_map_that_does_not_fit_names_client_module_and_value() -> None:
    f = {"m": rand(2, 1, 3, 7)}
    shapes = {"m": (4, 3)}
    check_kept(f, {"m": Kept(torch.tensor([0, 3]), None)}, shapes=shapes, who="client 2")
    with pytest.raises(ValueError, match=r"client 2: m.out keeps 3 ids but the factors have 2"):
        check_kept(f, {"m": Kept(torch.tensor([0, 1, 3]), None)}, shapes=shapes, who="client 2")
    with pytest.raises(ValueError, match=r"client 2: m.out ids must be in \[0, 4\), got 0..9"):
        check_kept(f, {"m": Kept(torch.tensor([0, 9]), None)}, shapes=shapes, who="client 2")
    with pytest.raises(ValueError, match="strictly increasing"):
        check_kept(f, {"m": Kept(torch.tensor([3, 1]), None)}, shapes=shapes, who="client 2")
    with pytest.raises(ValueError, match=r"client 2: m factors have shape \(2, 3\) but no kept"):
        check_kept(f, {}, shapes=shapes, who="client 2")
    with pytest.raises(ValueError, match="'x', which is not adapted"):
        check_kept(f, {"x": Kept(torch.tensor([0]), None)}, shapes=shapes, who="client 2")


def test_kept_map_record_round_trip_and_bad_key() -> None:
    kept = {"a.q_proj": Kept(torch.tensor([1, 5]), None), "a.o_proj": Kept(None, torch.tensor([2]))}
    back = kept_from_record(kept_to_record(kept), who="c")
    assert torch.equal(back["a.q_proj"].out, kept["a.q_proj"].out) and back["a.q_proj"].in_ is None
    assert torch.equal(back["a.o_proj"].in_, kept["a.o_proj"].in_)
    from flwr.app import ArrayRecord

    with pytest.raises(ValueError, match=r"client 9: kept-index key 'm\.rows'"):
        kept_from_record(ArrayRecord({"m.rows": torch.tensor([1])}), who="client 9")
