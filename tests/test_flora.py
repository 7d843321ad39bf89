"""flora: exact stacking, merged delta accumulated across rounds in `state`, rank kept bounded."""

from __future__ import annotations

import pytest
import torch

from fedllm.aggregators import Factors, get, round_spec


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ΔW₁ = 2·[[2, 0], [0, 0]] (own scaling 2), ΔW₂ = [[0, 0], [0, 3]]; weights ¼, ¾ → diag(1, 2.25).
ONE = Factors(t([[1.0], [0.0]]), t([[2.0, 0.0]]), 2.0)
TWO = Factors(t([[0.0], [1.0]]), t([[0.0, 3.0]]), 1.0)


def test_round_semantics_is_merge_and_reinitialise() -> None:
    spec = round_spec("flora")
    assert spec.merge and not spec.freeze_A and not spec.local_B


def test_first_round_is_the_exact_weighted_sum_in_svd_order() -> None:
    result = get("flora")([ONE, TWO], [1.0, 3.0])
    g = result.global_
    assert g.scaling == 1.0 and g.rank == 2
    assert torch.allclose(g.delta(), t([[1.0, 0.0], [0.0, 2.25]]))
    # B = LΣ^½ so BᵀB = Σ, decreasing.
    assert torch.allclose(g.B.T @ g.B, torch.diag(t([[2.25, 1.0]])[0]))
    assert torch.allclose(result.state["merged_B"] @ result.state["merged_A"], g.B @ g.A)


def test_second_round_adds_to_the_merged_delta_and_stays_bounded() -> None:
    first = get("flora")([ONE, TWO], [1.0, 3.0])
    fresh = Factors(t([[1.0], [1.0]]), t([[1.0, 1.0]]), 1.0)  # a client's new LoRA: ones(2, 2)
    second = get("flora")([fresh], [5.0], state=first.state)
    assert torch.allclose(second.global_.delta(), t([[2.0, 1.0], [1.0, 3.25]]))
    assert second.global_.rank == 2  # stacked rank 3, but a 2×2 delta needs at most 2


def test_duplicate_directions_are_dropped() -> None:
    same = [
        Factors(t([[1.0], [0.0]]), t([[1.0, 0.0]]), 1.0),
        Factors(t([[2.0], [0.0]]), t([[1.0, 0.0]]), 1.0),
    ]
    g = get("flora")(same, [1.0, 1.0]).global_
    assert g.rank == 1 and torch.allclose(g.delta(), t([[1.5, 0.0], [0.0, 0.0]]))


def test_global_rank_caps_the_merged_delta() -> None:
    g = get("flora")([ONE, TWO], [1.0, 3.0], global_rank=1).global_
    assert torch.allclose(g.delta(), t([[0.0, 0.0], [0.0, 2.25]]))


def test_mixed_ranks_exact_and_inputs_untouched() -> None:
    gen = torch.Generator().manual_seed(3)
    updates = [
        Factors(torch.randn(12, r, generator=gen), torch.randn(r, 9, generator=gen), 16.0 / r)
        for r in (2, 3, 5)
    ]
    copies = [(u.B.clone(), u.A.clone()) for u in updates]
    weights = [2.0, 1.0, 1.0]
    target = sum(w / 4 * u.delta() for w, u in zip(weights, updates, strict=True))
    g = get("flora")(updates, weights).global_
    assert g.B.dtype == torch.float32 and g.rank <= 9
    assert torch.allclose(g.delta(), target, atol=1e-4)
    for u, (B, A) in zip(updates, copies, strict=True):
        assert torch.equal(u.B, B) and torch.equal(u.A, A)


def test_bad_state_is_named() -> None:
    with pytest.raises(ValueError, match="merged_A"):
        get("flora")([ONE], [1.0], state={"merged_B": torch.zeros(2, 1, dtype=torch.float64)})
    bad = {
        "merged_B": torch.zeros(3, 1, dtype=torch.float64),
        "merged_A": torch.zeros(1, 2, dtype=torch.float64),
    }
    with pytest.raises(ValueError, match="module"):
        get("flora")([ONE], [1.0], state=bad)
