"""LoRA-FAIR (Bian et al., ICCV 2025): keep the averaged factors, correct B̄ towards ΔW*.

Closed form of min ‖ΔW* − (B̄+ΔB)Ā‖² + λ‖ΔB‖² (design/aggregation.md) in folded units: every
client's scaling sᵢ is folded into B, so the result has scaling 1 and λ penalises s·ΔB. Only thin
products are formed: ΔW*Āᵀ = Σpᵢsᵢ·Bᵢ(AᵢĀᵀ). Adapter-state semantics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, normalized_weights, register, reject_options
from .fedit import padded_mean
from .linalg import stack


def fair_correction(
    B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, lam: float
) -> torch.Tensor:
    """ΔB minimising ‖U@V − (B+ΔB)@A‖_F² + lam·‖ΔB‖_F²: (UVAᵀ − BAAᵀ)(AAᵀ + lam·I)⁻¹.

    lam = 0 gives the minimum-norm least-squares ΔB (pseudo-inverse). Float64 in, d×k never formed.
    """
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    gram = A @ A.T
    rhs = U @ (V @ A.T) - B @ gram
    if lam == 0:
        return rhs @ torch.linalg.pinv(gram, hermitian=True)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, rhs.T).T


@register("lorafair")
def lorafair(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    lam: float = 0.01,
    **options: Any,
) -> Aggregate:
    """Factors (B̄+ΔB, Ā), scaling 1, with (B̄, Ā) the FedIT mean padded/truncated to `global_rank`.

    Never worse than FedIT in ‖ΔW* − result‖_F; exact if lam = 0 and ΔW*'s row space lies in Ā's.
    """
    reject_options("lorafair", options)
    p = normalized_weights(updates, weights)
    B, A = padded_mean(updates, p)
    mean = Factors(B, A, 1.0)
    if global_rank is not None:
        mean = mean.truncate(global_rank)
    U, V = stack(
        [u.B for u in updates],
        [u.A for u in updates],
        [pi * u.scaling for pi, u in zip(p, updates, strict=True)],
    )
    corrected = mean.B + fair_correction(mean.B, mean.A, U, V, lam)
    dtype = updates[0].B.dtype
    return Aggregate(Factors(corrected.to(dtype), mean.A.to(dtype), 1.0))
