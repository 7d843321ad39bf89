"""flexlora: dense ΔW*, full SVD; equals the factored exact route; clients get their top-rⱼ part."""

from __future__ import annotations

import torch

from fedllm.aggregators import Factors, get, round_spec


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def diagonal_round() -> list[Factors]:
    """Two clients (scalings 2 and 1) whose mean update is diag(3, 1, 2) (weights ½, ½)."""
    one = Factors(
        t([[0.5, 0.0], [0.0, 0.0], [0.0, 0.5]]), t([[6.0, 0.0, 0.0], [0.0, 0.0, 4.0]]), 2.0
    )
    two = Factors(t([[0.0], [2.0], [0.0]]), t([[0.0, 1.0, 0.0]]), 1.0)
    return [one, two]


def test_default_is_lossless_and_svd_ordered() -> None:
    g = get("flexlora")(diagonal_round(), [1.0, 1.0]).global_
    assert g.rank == 3 and g.scaling == 1.0 and not round_spec("flexlora").merge
    assert torch.allclose(g.delta(), torch.diag(t([[3.0, 1.0, 2.0]])[0]))
    assert torch.allclose(g.B.T @ g.B, torch.diag(t([[3.0, 2.0, 1.0]])[0]))


def test_global_rank_keeps_the_top_directions() -> None:
    g = get("flexlora")(diagonal_round(), [1.0, 1.0], global_rank=2).global_
    assert torch.allclose(g.delta(), torch.diag(t([[3.0, 0.0, 2.0]])[0]))


def test_a_client_gets_its_best_rank_approximation_under_its_own_scaling() -> None:
    g = get("flexlora")(diagonal_round(), [1.0, 1.0]).global_
    mine = g.truncate(1, 16.0)  # a rank-1 client with α = 16
    assert mine.B.shape == (3, 1) and mine.A.shape == (1, 3)
    assert torch.allclose(mine.delta(), torch.diag(t([[3.0, 0.0, 0.0]])[0]))


def test_matches_the_factored_exact_route_with_mixed_ranks() -> None:
    gen = torch.Generator().manual_seed(5)
    updates = [
        Factors(torch.randn(20, r, generator=gen), torch.randn(r, 15, generator=gen), 16.0 / r)
        for r in (2, 4, 8)
    ]
    weights = [3.0, 1.0, 2.0]
    dense = get("flexlora")(updates, weights, global_rank=6).global_
    factored = get("svd")(updates, weights, global_rank=6, method="exact").global_
    assert dense.B.dtype == torch.float32 and dense.rank == 6
    assert torch.allclose(dense.delta(), factored.delta(), atol=1e-4)
