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


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (torch.linalg.matrix_norm(x) * torch.linalg.matrix_norm(y)))


def test_iterative_similarity_solver_reaches_the_target_direction() -> None:
    # ΔW* = [4.5, 0.75]ᵀ, FedIT B̄Ā = [5.25, 0.375]ᵀ: cos = 23.90625/(4.56207·5.26338) = 0.99560.
    target = t([[4.5], [0.75]])
    fedit = get("fedit")([ONE, TWO], [1.0, 3.0]).global_
    assert cosine(target, fedit.delta()) == pytest.approx(0.99560, abs=1e-5)
    g = get("lorafair")([ONE, TWO], [1.0, 3.0], lam=0.0, solver="iterative", steps=300).global_
    assert torch.equal(g.A, fedit.A)
    assert cosine(target, g.delta()) > 0.99999
    # With λ = 0 only the direction matters: B̄+ΔB ∝ [3, 0.5], i.e. B[0] = 6·B[1].
    assert float(g.B[0, 0] / g.B[1, 0]) == pytest.approx(6.0, rel=1e-2)


def test_iterative_penalty_holds_the_correction_back() -> None:
    updates, weights = make(4), [0.2, 0.3, 0.5]
    target = sum(w * u.delta() for w, u in zip(weights, updates, strict=True))
    fedit = get("fedit")(updates, weights).global_
    free = get("lorafair")(updates, weights, lam=0.0, solver="iterative").global_
    held = get("lorafair")(updates, weights, lam=10.0, solver="iterative").global_
    assert cosine(target, free.delta()) > cosine(target, fedit.delta()) + 0.05
    moved = [torch.linalg.matrix_norm(g.B - fedit.B) for g in (free, held)]
    assert moved[1] < 0.1 * moved[0]


def test_unknown_solver_is_named() -> None:
    with pytest.raises(ValueError, match="solver"):
        get("lorafair")([ONE, TWO], [1.0, 1.0], solver="sgd")


def test_a_numerically_singular_ridge_falls_back_to_least_squares() -> None:
    """h105: duplicate rows of A at 1e7 make AAᵀ + λI exactly singular in float64 (λ is lost
    next to 1e14), and the solve raised: the aggregator failed every round. The minimum-norm
    least-squares ΔB takes over, finite, and with it the correction still moves B."""
    from fedllm.aggregators.lorafair import fair_correction

    A = torch.tensor([[1e7, 2e7, 3e7], [1e7, 2e7, 3e7]], dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.solve(A @ A.T + 0.01 * torch.eye(2, dtype=torch.float64), A[:, :1])
    B = torch.zeros(4, 2, dtype=torch.float64)
    target = (torch.ones(4, 1, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    dB = fair_correction(B, A, terms=[(1.0, *target)], lam=0.01)
    assert dB.shape == B.shape and bool(torch.isfinite(dB).all()) and dB.abs().sum() > 0
