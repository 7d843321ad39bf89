"""bench/gauge_noise.py: the noise gain G = Σ (d‖A‖² + k‖sB‖²) of a split, by hand, and the
factor deltas client-level clipping meets."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
try:
    import gauge_noise as G
finally:
    sys.path.pop(0)


def test_gain_and_signal_by_hand() -> None:
    # d = 2, r = 1, k = 3, s = 0.5: G = 2·‖A‖² + 3·‖sB‖² = 2·4 + 3·0.25 = 8.75;
    # ΔW = 0.5·B·A has one entry 0.5·1·2 = 1.
    B, A = torch.tensor([[1.0], [0.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    gain, signal = G.gain_and_signal({"m": (B, A, 0.5)})
    assert gain == pytest.approx(8.75) and signal == pytest.approx(1.0)
    # another gauge of the same product (B·4, A/4): same ΔW, G = 2·0.25 + 3·0.25·16 = 12.5
    gain, signal = G.gain_and_signal({"m": (4 * B, A / 4, 0.5)})
    assert gain == pytest.approx(12.5) and signal == pytest.approx(1.0)
    # rank 1 of a rank-2 global: the second component (noiseless under DP) is left out
    B2, A2 = torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0], [0, 0, 5]])
    gain, signal = G.gain_and_signal({"m": (B2, A2, 0.5)}, rank=1)
    assert gain == pytest.approx(8.75) and signal == pytest.approx(0.5 * math.hypot(2, 15))


def test_svd_gain_by_hand_is_the_gain_of_the_svd_split() -> None:
    # sBA = 0.5·[1, 0]ᵀ·[2, 0, 0] has one singular value 1: G = (d + k)·1 = 5, whatever the gauge
    B, A = torch.tensor([[1.0], [0.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    assert G.svd_gain({"m": (B, A, 0.5)}) == pytest.approx(5.0)
    assert G.svd_gain({"m": (4 * B, A / 4, 0.5)}) == pytest.approx(5.0)
    # a random rank-3 global: the split U√S, √S·Vᵀ of its SVD has the gain svd_gain reports,
    # and only its first 2 components count at rank 2
    torch.manual_seed(1)
    B, A, s = torch.randn(7, 3), torch.randn(3, 4), 0.3
    U, S, Vh = torch.linalg.svd(s * B @ A, full_matrices=False)
    split = (U[:, :2] * S[:2].sqrt(), S[:2].sqrt()[:, None] * Vh[:2], 1.0)
    gain, _ = G.gain_and_signal({"m": split})
    assert G.svd_gain({"m": (B, A, s)}, rank=2) == pytest.approx(gain, rel=1e-5)


def test_gain_is_the_first_order_noise_energy() -> None:
    """Noise of σ on the folded factors (sB + ξ_B, A + ξ_A), as client-level DP adds it:
    E‖ξ_B·A + sB·ξ_A‖² = σ²·G, checked by sampling."""
    torch.manual_seed(0)
    B, A, s, sigma = torch.randn(6, 2), torch.randn(2, 5), 0.7, 0.1
    gain, _ = G.gain_and_signal({"m": (B, A, s)})
    noise = [(sigma * torch.randn(6, 2), sigma * torch.randn(2, 5)) for _ in range(20000)]
    draws = [float((xB @ A + s * B @ xA).square().sum()) for xB, xA in noise]
    assert sum(draws) / len(draws) == pytest.approx(sigma**2 * gain, rel=0.03)


def test_delta_norms_cut_the_start_to_the_clients_rank() -> None:
    # start at rank 2, scaling 1; a rank-1 client at scaling 2 sent B = [[1], [1]], A = [[1, 1]]:
    # ΔB = 2·[1, 1] − [1, 0] = [1, 2], ΔA = [1, 1] − [0, 1] = [1, 0]: norm √(1 + 4 + 1) = √6.
    B0, A0 = torch.tensor([[1.0, 5.0], [0.0, 5.0]]), torch.tensor([[0.0, 1.0], [9.0, 9.0]])
    update = {"m": (torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0, 1.0]]), 2.0)}
    start = {"m": (B0, A0, 1.0)}
    assert G.delta_norms({0: (5, update)}, start, round_=5) == [pytest.approx(math.sqrt(6))]
    assert G.delta_norms({0: (4, update)}, start, round_=5) == []  # an older round's update
