"""LoRA-FAIR (Bian et al., ICCV 2025): keep the averaged factors, correct B̄ towards ΔW*.

Closed form of min ‖ΔW* − (B̄+ΔB)Ā‖² + λ‖ΔB‖² (design/aggregation.md) in folded units: every
client's scaling sᵢ is folded into B, so the result has scaling 1 and λ penalises s·ΔB. Only thin
products are formed, one client at a time: ΔW*Āᵀ = Σpᵢsᵢ·Bᵢ(AᵢĀᵀ). Adapter-state semantics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, normalized_weights, register, reject_options
from .fedit import padded_mean


def fair_correction(
    B: torch.Tensor,
    A: torch.Tensor,
    terms: Iterable[tuple[float, torch.Tensor, torch.Tensor]],
    lam: float,
) -> torch.Tensor:
    """ΔB minimising ‖Σwᵢ·BᵢAᵢ − (B+ΔB)A‖_F² + lam·‖ΔB‖_F², terms = (wᵢ, Bᵢ, Aᵢ); float64 B, A.

    ΔB = (Σwᵢ·Bᵢ(AᵢAᵀ) − B·AAᵀ)(AAᵀ + lam·I)⁻¹, one client at a time (d×r temporaries only);
    lam = 0 gives the minimum-norm least-squares ΔB (pseudo-inverse).
    """
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    gram = A @ A.T
    rhs = -(B @ gram)
    for w, Bi, Ai in terms:
        rhs.add_(Bi.double() @ (Ai.double() @ A.T), alpha=w)
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
    terms = ((pi * u.scaling, u.B, u.A) for pi, u in zip(p, updates, strict=True))
    corrected = mean.B + fair_correction(mean.B, mean.A, terms, lam)
    dtype = updates[0].B.dtype
    return Aggregate(Factors(corrected.to(dtype), mean.A.to(dtype), 1.0))
