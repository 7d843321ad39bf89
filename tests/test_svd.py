"""svd: exact Σpᵢsᵢ·BᵢAᵢ in SVD order; truncation to each client's rank is Eckart–Young optimal."""

from __future__ import annotations

import pytest
import torch

from fedllm.aggregators import Factors, get


def make(d: int, k: int, ranks: list[int], alpha: float, seed: int = 0) -> list[Factors]:
    g = torch.Generator().manual_seed(seed)
    return [
        Factors(
            torch.randn(d, r, generator=g, dtype=torch.float64),
            torch.randn(r, k, generator=g, dtype=torch.float64),
            alpha / r,
        )
        for r in ranks
    ]


def exact_mean(updates: list[Factors], weights: list[float]) -> torch.Tensor:
    total = sum(weights)
    return sum(w / total * u.delta() for w, u in zip(weights, updates, strict=True))


@pytest.mark.parametrize("method", ["exact", "rsvd", "dense", "auto"])
def test_full_rank_global_is_the_exact_mean(method: str) -> None:
    updates = make(50, 40, [2, 4, 8], alpha=16.0)
    weights = [10.0, 30.0, 60.0]
    result = get("svd")(updates, weights, method=method)
    g = result.global_
    assert g.rank == 14 and g.scaling == 1.0 and result.state == {}
    assert torch.allclose(g.delta(), exact_mean(updates, weights), rtol=0, atol=1e-10)


def test_default_rank_is_capped_by_the_module() -> None:
    updates = make(6, 5, [4, 4], alpha=8.0)
    g = get("svd")(updates, [1.0, 1.0]).global_
    assert g.rank == 5
    assert torch.allclose(g.delta(), exact_mean(updates, [1.0, 1.0]), atol=1e-10)


def test_components_at_numerical_zero_are_dropped() -> None:
    # two clients with the same rank-2 update span 2 directions, not 4; a zero B adds none
    same = make(20, 12, [2], alpha=4.0, seed=3)[0]
    zero = Factors(torch.zeros(20, 3, dtype=torch.float64), torch.randn(3, 12).double(), 1.0)
    for method in ("exact", "rsvd", "dense"):
        g = get("svd")([same, same, zero], [1.0, 2.0, 1.0], method=method).global_
        assert g.rank == 2, method
        assert torch.allclose(g.delta(), 0.75 * same.delta(), atol=1e-10)
    f32 = Factors(same.B.float(), same.A.float(), same.scaling)  # float32: ε₃₂'s zero
    assert get("svd")([f32, f32], [1.0, 1.0], method="rsvd").global_.rank == 2
    # an all-zero aggregate keeps one (zero) component; an asked-for rank is kept, its extra
    # components at numerical zero
    assert get("svd")([zero], [1.0]).global_.rank == 1
    padded = get("svd")([same, same], [1.0, 1.0], global_rank=4).global_
    assert padded.rank == 4 and padded.B[:, 2:].abs().max() < 1e-12


def test_truncating_to_each_clients_rank_is_optimal() -> None:
    updates = make(30, 24, [2, 4, 8], alpha=16.0, seed=1)
    weights = [1.0, 2.0, 3.0]
    target = exact_mean(updates, weights)
    sigma = torch.linalg.svdvals(target)
    g = get("svd")(updates, weights).global_
    for u in updates:
        mine = g.truncate(u.rank, u.scaling)
        assert mine.rank == u.rank and mine.scaling == u.scaling
        error = torch.linalg.matrix_norm(target - mine.delta()).item()
        assert error == pytest.approx(sigma[u.rank :].norm().item(), rel=1e-9)


def test_weights_are_normalised() -> None:
    one = Factors(torch.tensor([[1.0]]), torch.tensor([[2.0]]), 1.0)
    two = Factors(torch.tensor([[3.0]]), torch.tensor([[1.0]]), 1.0)
    for weights in ([1.0, 3.0], [0.25, 0.75], [10.0, 30.0]):
        g = get("svd")([one, two], weights).global_
        # 0.25·2 + 0.75·3 = 2.75
        assert g.delta().item() == pytest.approx(2.75)
        assert g.B.dtype == torch.float32


def test_global_rank_and_method_options() -> None:
    updates = make(40, 30, [4, 4, 4], alpha=8.0, seed=2)
    g = get("svd")(updates, [1.0] * 3, global_rank=3, method="rsvd", power_iters=4, seed=5)
    assert g.global_.rank == 3
    sigma = torch.linalg.svdvals(exact_mean(updates, [1.0] * 3))
    error = torch.linalg.matrix_norm(exact_mean(updates, [1.0] * 3) - g.global_.delta()).item()
    assert error < 1.05 * sigma[3:].norm().item()


def test_bad_weights_and_options_rejected() -> None:
    updates = make(5, 4, [1, 1], alpha=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        get("svd")(updates, [1.0, -0.5])
    with pytest.raises(ValueError, match="zero"):
        get("svd")(updates, [0.0, 0.0])
    with pytest.raises(TypeError, match="oversampling"):
        get("svd")(updates, [1.0, 1.0], oversampling=4)


def test_float32_clients_rsvd_within_one_percent_of_optimal() -> None:
    # 20 float32 clients (Σrᵢ = 160 on 120×100), rank 12, default oversample and power iterations:
    # the float32 sketch stays within 1.01× the optimal tail, as float64 clients do.
    updates = make(120, 100, [2, 4, 8, 16] * 5, alpha=16.0, seed=4)
    low = [Factors(u.B.float(), u.A.float(), u.scaling) for u in updates]
    weights = [float(1 + i % 3) for i in range(20)]
    target = exact_mean(low, weights)
    optimal = torch.linalg.svdvals(target)[12:].norm().item()
    g32 = get("svd")(low, weights, global_rank=12, method="rsvd").global_
    g64 = get("svd")(updates, weights, global_rank=12, method="rsvd").global_
    assert g32.B.dtype == torch.float32
    error = torch.linalg.matrix_norm(target - g32.delta()).item()
    assert error <= 1.01 * optimal
    # float32 clients sketch "mixed" (bf16 range finding where native): the same error to 0.2%
    # of the optimum; on the plain float32 path the products agree to 10⁻⁵ (test_linalg.py)
    assert abs(error - torch.linalg.matrix_norm(target - g64.delta()).item()) <= 2e-3 * optimal
