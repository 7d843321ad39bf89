"""FedIT: per-factor weighted means, zero-padding, scaling folding, and its cross-term bias."""

from __future__ import annotations

import pytest
import torch

from fedllm.aggregators import Factors, get


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_hand_computed_rank_one_case() -> None:
    one = Factors(t([[2.0], [1.0]]), t([[3.0]]), 1.0)
    two = Factors(t([[4.0], [0.0]]), t([[1.0]]), 1.0)
    result = get("fedit")([one, two], [1.0, 3.0])  # p = 0.25, 0.75
    g = result.global_
    assert torch.allclose(g.B, t([[3.5], [0.25]]))
    assert torch.allclose(g.A, t([[1.5]]))
    assert g.scaling == 1.0 and result.state == {}
    # FedIT gives [[5.25], [0.375]]; the exact mean Σpᵢ BᵢAᵢ is [[4.5], [0.75]].
    assert torch.allclose(g.delta(), t([[5.25], [0.375]]))
    exact = get("svd")([one, two], [1.0, 3.0]).global_
    assert torch.allclose(exact.delta(), t([[4.5], [0.75]]))


def test_each_clients_scaling_is_folded_into_its_B() -> None:
    one = Factors(t([[2.0], [1.0]]), t([[3.0]]), 2.0)
    two = Factors(t([[4.0], [0.0]]), t([[1.0]]), 0.5)
    g = get("fedit")([one, two], [1.0, 3.0]).global_
    # B̄ = 0.25·2·[2, 1] + 0.75·0.5·[4, 0] = [2.5, 0.5];  Ā = 1.5.
    assert torch.allclose(g.B, t([[2.5], [0.5]]))
    assert torch.allclose(g.delta(), t([[3.75], [0.75]]))


def test_shared_scaling_matches_textbook_fedit() -> None:
    g = torch.Generator().manual_seed(0)
    updates = [Factors(torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g), 4.0)] * 2
    updates[1] = Factors(updates[1].B * -0.5, updates[1].A + 1.0, 4.0)
    agg = get("fedit")(updates, [0.4, 0.6]).global_
    textbook = (
        4.0 * (0.4 * updates[0].B + 0.6 * updates[1].B) @ (0.4 * updates[0].A + 0.6 * updates[1].A)
    )
    assert torch.allclose(agg.delta().float(), textbook, atol=1e-5)


def test_bias_opposite_factor_signs_cancel_but_svd_is_exact() -> None:
    # Client 2 sends (−B, −A): the very same update as client 1, yet FedIT averages it to zero.
    B, A = t([[1.0], [2.0]]), t([[3.0, -1.0]])
    updates = [Factors(B, A, 1.0), Factors(-B, -A, 1.0)]
    target = B @ A  # mean of two identical updates
    assert not get("fedit")(updates, [1.0, 1.0]).global_.delta().any()
    assert torch.allclose(get("svd")(updates, [1.0, 1.0]).global_.delta(), target)


def test_bias_orthogonal_clients() -> None:
    # ΔW* = ½(e1e1ᵀ + e2e2ᵀ) = ½I; FedIT gives ¼·11ᵀ, off by ¼ in every entry.
    updates = [Factors(t([[1.0], [0.0]]), t([[1.0, 0.0]]), 1.0)]
    updates.append(Factors(t([[0.0], [1.0]]), t([[0.0, 1.0]]), 1.0))
    fedit = get("fedit")(updates, [1.0, 1.0]).global_.delta()
    assert torch.allclose(fedit, t([[0.25, 0.25], [0.25, 0.25]]))
    assert torch.linalg.matrix_norm(fedit - 0.5 * torch.eye(2)).item() == pytest.approx(0.5)
    svd = get("svd")(updates, [1.0, 1.0]).global_.delta()
    assert torch.allclose(svd, 0.5 * torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_mixed_ranks_are_zero_padded() -> None:
    low = Factors(t([[1.0], [2.0]]), t([[1.0, 1.0]]), 1.0)
    high = Factors(t([[1.0, 0.0], [0.0, 1.0]]), t([[2.0, 0.0], [0.0, 3.0]]), 1.0)
    g = get("fedit")([low, high], [1.0, 1.0]).global_
    assert torch.allclose(g.B, t([[1.0, 0.0], [1.0, 0.5]]))
    assert torch.allclose(g.A, t([[1.5, 0.5], [0.0, 1.5]]))
    assert torch.allclose(g.delta(), t([[1.5, 0.5], [1.5, 1.25]]))


def test_global_rank_truncates_or_pads() -> None:
    low = Factors(t([[1.0], [2.0]]), t([[1.0, 1.0]]), 1.0)
    high = Factors(t([[1.0, 0.0], [0.0, 1.0]]), t([[2.0, 0.0], [0.0, 3.0]]), 1.0)
    small = get("fedit")([low, high], [1.0, 1.0], global_rank=1).global_
    assert torch.allclose(small.B, t([[1.0], [1.0]])) and torch.allclose(small.A, t([[1.5, 0.5]]))
    big = get("fedit")([low, high], [1.0, 1.0], global_rank=3).global_
    assert big.rank == 3 and not big.B[:, 2].any() and not big.A[2].any()


def test_dtype_kept_and_inputs_untouched() -> None:
    B, A = torch.ones(4, 2), torch.ones(2, 3)
    g = get("fedit")([Factors(B, A, 2.0), Factors(B, A, 2.0)], [1.0, 1.0]).global_
    assert g.B.dtype == torch.float32 and g.A.dtype == torch.float32
    assert torch.equal(g.B, 2 * torch.ones(4, 2))
    assert torch.equal(B, torch.ones(4, 2)) and torch.equal(A, torch.ones(2, 3))
