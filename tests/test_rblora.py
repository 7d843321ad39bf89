"""rblora: each component is averaged only over the clients that have it."""

from __future__ import annotations

import torch

from fedllm.aggregators import Factors, get


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_hand_computed_mixed_ranks() -> None:
    low = Factors(t([[4.0], [0.0]]), t([[1.0, 1.0]]), 1.0)
    high = Factors(t([[0.0, 2.0], [4.0, 6.0]]), t([[1.0, 0.0], [2.0, 3.0]]), 0.5)
    g = get("rblora")([low, high], [1.0, 3.0]).global_  # p = ¼, ¾
    # Component 0 (both clients): B = ¼·[4, 0] + ¾·½·[0, 4] = [1, 1.5];  A = ¼·[1, 1] + ¾·[1, 0].
    # Component 1 (only `high`, weight ¾ renormalised to 1): B = ½·[2, 6] = [1, 3];  A = [2, 3].
    assert torch.allclose(g.B, t([[1.0, 1.0], [1.5, 3.0]]))
    assert torch.allclose(g.A, t([[1.0, 0.25], [2.0, 3.0]]))
    # FedIT would shrink component 1 by ¾ in each factor.
    fedit = get("fedit")([low, high], [1.0, 3.0]).global_
    assert torch.allclose(fedit.B[:, 1], 0.75 * g.B[:, 1])


def test_equal_ranks_reduce_to_fedit() -> None:
    gen = torch.Generator().manual_seed(0)
    updates = [
        Factors(torch.randn(6, 3, generator=gen), torch.randn(3, 5, generator=gen), s)
        for s in (1.0, 2.0, 0.5)
    ]
    rb = get("rblora")(updates, [1.0, 2.0, 3.0]).global_
    fedit = get("fedit")(updates, [1.0, 2.0, 3.0]).global_
    assert torch.allclose(rb.B, fedit.B, atol=1e-6) and torch.allclose(rb.A, fedit.A, atol=1e-6)
    assert rb.B.dtype == torch.float32


def test_zero_weight_owner_leaves_component_zero() -> None:
    low = Factors(t([[1.0], [1.0]]), t([[1.0, 1.0]]), 1.0)
    high = Factors(
        torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64), 1.0
    )
    g = get("rblora")([low, high], [1.0, 0.0]).global_
    assert torch.isfinite(g.B).all() and not g.B[:, 1].any() and not g.A[1].any()
