"""ffa: B-only averaging over a shared frozen A is exact, also for mixed ranks and scalings."""

from __future__ import annotations

import pytest
import torch

from fedllm.aggregators import Factors, get


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_hand_computed() -> None:
    A0 = t([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    low = Factors(t([[2.0], [4.0]]), A0[:1], 1.0)
    high = Factors(t([[1.0, 1.0], [0.0, 2.0]]), A0, 0.5)
    g = get("ffa")([low, high], [1.0, 1.0]).global_
    # B̄ = ½·1·[[2, 0], [4, 0]] + ½·½·[[1, 1], [0, 2]] = [[1.25, 0.25], [2, 0.5]]
    assert torch.allclose(g.B, t([[1.25, 0.25], [2.0, 0.5]]))
    assert torch.equal(g.A, A0) and g.scaling == 1.0


def test_exact_for_slices_of_one_frozen_A() -> None:
    gen = torch.Generator().manual_seed(0)
    A0 = torch.randn(8, 12, generator=gen, dtype=torch.float64)
    ranks, weights = [2, 8, 4], [5.0, 1.0, 2.0]
    updates = [
        Factors(torch.randn(10, r, generator=gen, dtype=torch.float64), A0[:r], 16.0 / r)
        for r in ranks
    ]
    target = sum(w / 8.0 * u.delta() for w, u in zip(weights, updates, strict=True))
    g = get("ffa")(updates, weights).global_
    assert torch.allclose(g.delta(), target, atol=1e-12)
    # FedIT on the same updates is not exact (the padded A rows get diluted).
    assert not torch.allclose(get("fedit")(updates, weights).global_.delta(), target, atol=1e-3)


def test_rejects_unshared_A() -> None:
    one = Factors(torch.ones(3, 2), torch.ones(2, 4), 1.0)
    two = Factors(torch.ones(3, 1), torch.full((1, 4), 2.0), 1.0)
    with pytest.raises(ValueError, match="client 1"):
        get("ffa")([one, two], [1.0, 1.0])
    assert get("ffa")([one, two], [1.0, 1.0], atol=1.5).global_.rank == 2


def test_global_rank_and_no_aliasing() -> None:
    A0 = torch.ones(2, 3)
    updates = [Factors(torch.ones(4, 2), A0, 1.0)]
    g = get("ffa")(updates, [1.0], global_rank=1).global_
    assert g.rank == 1
    g.A.add_(1.0)
    assert torch.equal(A0, torch.ones(2, 3))


def test_the_frozen_a_in_the_state_outlasts_a_round_of_low_rank_clients() -> None:
    """h105: a round whose largest client had rank 1 made the global A one row, and the top
    rank's other rows were dead (zero-padded) for every later round. The state's A₀ stays."""
    A0 = t([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    low = Factors(t([[2.0], [4.0]]), A0[:1], 1.0)
    out = get("ffa")([low], [1.0], state={"A": A0})
    assert torch.equal(out.global_.A, A0) and torch.equal(out.state["A"], A0)
    assert torch.allclose(out.global_.B, t([[2.0, 0.0], [4.0, 0.0]]))
    # above a global_rank of 1: the client holds a zero row past it, as it was sent
    cut = out.global_.truncate(1)
    sent = cut.truncate(2).A  # what a rank-2 client is sent: [A0[0]; 0]
    high = Factors(t([[1.0, 1.0], [0.0, 2.0]]), sent, 0.5)
    again = get("ffa")([high], [1.0], global_rank=1, state={"A": cut.A})
    assert again.global_.rank == 1 and torch.equal(again.state["A"], A0[:1])
    # B̄ = ½·[[1, 1], [0, 2]]; the zero row drops B's second column from ΔW
    assert torch.allclose(again.global_.delta(), t([[0.5], [0.0]]) @ A0[:1])
