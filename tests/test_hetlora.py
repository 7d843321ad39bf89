"""hetlora: norm-weighted zero-padded factor averaging, norms computed from the factors."""

from __future__ import annotations

import pytest
import torch

from fedllm.aggregators import Factors, get
from fedllm.aggregators.hetlora import delta_norm


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_delta_norm_matches_dense() -> None:
    g = torch.Generator().manual_seed(0)
    f = Factors(torch.randn(20, 5, generator=g), torch.randn(5, 15, generator=g), 0.25)
    assert delta_norm(f) == pytest.approx(torch.linalg.matrix_norm(f.delta()).item(), rel=1e-12)


def test_hand_computed_weights() -> None:
    one = Factors(t([[1.0], [0.0]]), t([[3.0, 4.0]]), 1.0)  # ‖ΔW‖ = 5
    two = Factors(t([[0.0], [1.0]]), t([[1.0, 0.0]]), 2.0)  # ‖ΔW‖ = 2
    g = get("hetlora")([one, two], [1.0, 1.0]).global_
    # q = (5/7, 2/7): B̄ = 5/7·[1, 0] + 2/7·2·[0, 1];  Ā = 5/7·[3, 4] + 2/7·[1, 0]
    assert torch.allclose(g.B, t([[5 / 7], [4 / 7]]))
    assert torch.allclose(g.A, t([[17 / 7, 20 / 7]]))
    assert g.scaling == 1.0


def test_data_weights_multiply_norms() -> None:
    one = Factors(t([[1.0], [0.0]]), t([[3.0, 4.0]]), 1.0)  # 5
    two = Factors(t([[0.0], [1.0]]), t([[1.0, 0.0]]), 2.0)  # 2
    g = get("hetlora")([one, two], [2.0, 5.0]).global_  # q ∝ (2·5, 5·2): equal
    assert torch.allclose(g.B, t([[0.5], [1.0]]))


def test_all_zero_updates_fall_back_to_data_weights() -> None:
    # peft initialises B = 0: every norm is zero, so A is averaged with pᵢ.
    one = Factors(torch.zeros(2, 1, dtype=torch.float64), t([[1.0, 0.0]]), 1.0)
    two = Factors(torch.zeros(2, 2, dtype=torch.float64), t([[0.0, 1.0], [1.0, 1.0]]), 1.0)
    g = get("hetlora")([one, two], [1.0, 3.0]).global_
    assert g.rank == 2 and not g.B.any()
    assert torch.allclose(g.A, t([[0.25, 0.75], [0.75, 0.75]]))
