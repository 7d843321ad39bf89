"""lorafair: closed-form ridge correction of B̄; never worse than FedIT; exact in the span of Ā."""

from __future__ import annotations

import pytest
import torch

from fedllm.aggregators import Factors, get


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


ONE = Factors(t([[2.0], [1.0]]), t([[3.0]]), 1.0)
TWO = Factors(t([[4.0], [0.0]]), t([[1.0]]), 1.0)


def test_hand_computed_without_penalty_is_exact() -> None:
    # FedIT: B̄ = [3.5, 0.25], Ā = 1.5; ΔW* = [4.5, 0.75]. ΔB = (ΔW* − B̄Ā)Ā/Ā² = [−0.5, 0.25].
    g = get("lorafair")([ONE, TWO], [1.0, 3.0], lam=0.0).global_
    assert torch.allclose(g.B, t([[3.0], [0.5]]))
    assert torch.allclose(g.A, t([[1.5]]))
    assert torch.allclose(g.delta(), t([[4.5], [0.75]]))


def test_hand_computed_with_penalty() -> None:
    # ΔB = (ΔW* − B̄Ā)Ā / (Ā² + λ) = [−0.75, 0.375]·1.5 / 3 = [−0.375, 0.1875]
    g = get("lorafair")([ONE, TWO], [1.0, 3.0], lam=0.75).global_
    assert torch.allclose(g.B, t([[3.125], [0.4375]]))


def make(seed: int) -> list[Factors]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Factors(
            torch.randn(12, r, generator=gen, dtype=torch.float64),
            torch.randn(r, 9, generator=gen, dtype=torch.float64),
            8.0 / r,
        )
        for r in (2, 3, 4)
    ]


@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0])
def test_stationary_and_no_worse_than_fedit(lam: float) -> None:
    updates, weights = make(1), [0.2, 0.3, 0.5]
    target = sum(w * u.delta() for w, u in zip(weights, updates, strict=True))
    fedit = get("fedit")(updates, weights).global_
    fair = get("lorafair")(updates, weights, lam=lam).global_
    assert torch.equal(fair.A, fedit.A)
    # Gradient of ‖ΔW* − (B̄+ΔB)Ā‖² + λ‖ΔB‖² vanishes: (ΔW* − BĀ)Āᵀ = λΔB.
    gap = (target - fair.delta()) @ fair.A.T
    assert torch.allclose(gap, lam * (fair.B - fedit.B), atol=1e-9)
    error = torch.linalg.matrix_norm(target - fair.delta())
    assert error < torch.linalg.matrix_norm(target - fedit.delta())


def test_global_rank_truncates_before_correcting() -> None:
    updates = make(2)
    g = get("lorafair")(updates, [1.0, 1.0, 1.0], global_rank=2, lam=0.0).global_
    assert g.rank == 2
    target = sum(u.delta() for u in updates) / 3
    # Optimal for the fixed rank-2 Ā: the residual is orthogonal to Ā's rows.
    assert torch.allclose((target - g.delta()) @ g.A.T, torch.zeros(12, 2, dtype=torch.float64))


def test_negative_lambda_rejected() -> None:
    with pytest.raises(ValueError, match="lam"):
        get("lorafair")([ONE, TWO], [1.0, 1.0], lam=-1.0)
