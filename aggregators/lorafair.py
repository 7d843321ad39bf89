"""LoRA-FAIR (Bian et al., ICCV 2025): keep the averaged factors, correct B̄ towards ΔW*.

Two solvers for ΔB, both in folded units (every client's sᵢ = α/rᵢ folded into B, so the result
has scaling 1 and λ penalises s·ΔB), both forming thin products only (ΔW*Āᵀ = Σpᵢsᵢ·Bᵢ(AᵢĀᵀ)):
- "closed" (default): min ‖ΔW* − (B̄+ΔB)Ā‖_F² + λ‖ΔB‖_F², a ridge solve (design/aggregation.md).
- "iterative": the paper's objective, min 1 − cos(ΔW*, (B̄+ΔB)Ā) + λ‖ΔB‖_F with the Frobenius
  cosine similarity, solved by Adam on the server from ΔB = 0 (paper: λ = 0.01).
Adapter-state semantics: client j restarts from truncate(rⱼ, sⱼ) of the corrected factors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch

from .base import (
    Aggregate,
    Factors,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    normalized_weights,
    padded_mean,
    reject_options,
)
from .registry import register


def fair_correction(
    B: torch.Tensor,
    A: torch.Tensor,
    *,
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
    system = gram + lam * eye
    solution, info = torch.linalg.solve_ex(system, rhs.T)
    if int(info.max()) != 0 or not bool(torch.isfinite(solution).all()):
        # lam is lost next to a huge gram (h105: duplicate rows of A at 1e7 made it exactly
        # singular and the solve raise): the minimum-norm least-squares ΔB instead
        return rhs @ torch.linalg.pinv(system, hermitian=True)
    return solution.T


def fair_correction_iterative(
    B: torch.Tensor,
    A: torch.Tensor,
    *,
    terms: Iterable[tuple[float, torch.Tensor, torch.Tensor]],
    lam: float,
    steps: int = 200,
    lr: float = 0.01,
) -> torch.Tensor:
    """ΔB minimising 1 − cos(Σwᵢ·BᵢAᵢ, (B+ΔB)A) + lam·‖ΔB‖_F by `steps` Adam steps from 0.

    `lr` is relative to the RMS entry of B (so the solver does not depend on the adapter's scale).
    Every quantity comes from thin products: ⟨ΔW*, XA⟩ = ⟨ΔW*Aᵀ, X⟩, ‖XA‖² = Σ(XᵀX)⊙(AAᵀ).
    """
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    if steps < 0 or not lr > 0:
        raise ValueError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    gram = A @ A.T
    target_At = torch.zeros_like(B)  # ΔW*Āᵀ
    Ws, Vs = [], []
    for w, Bi, Ai in terms:
        Bi, Ai = Bi.double(), Ai.double()
        target_At.add_(Bi @ (Ai @ A.T), alpha=w)
        Ws.append(Bi * w)
        Vs.append(Ai)
    U, V = torch.cat(Ws, dim=1), torch.cat(Vs, dim=0)
    target_norm = ((U.T @ U) * (V @ V.T)).sum().clamp_min(0).sqrt()
    delta = torch.zeros_like(B, requires_grad=True)
    if target_norm == 0 or steps == 0:
        return delta.detach()
    scale = B.pow(2).mean().sqrt().item() or target_At.pow(2).mean().sqrt().item() or 1.0
    opt = torch.optim.Adam([delta], lr=lr * scale)
    for _ in range(steps):
        X = B + delta
        norm = ((X.T @ X) * gram).sum().clamp_min(1e-300).sqrt()
        cosine = (target_At * X).sum() / (target_norm * norm)
        penalty = (delta.pow(2).sum() + 1e-30).sqrt()  # ‖ΔB‖_F, smooth at 0
        loss = 1 - cosine + lam * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
    return delta.detach()


Solver = Literal["closed", "iterative"]
SOLVERS = get_args(Solver)


@register("lorafair")
def lorafair(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    lam: NonNegativeFloat = 0.01,
    solver: Solver = "closed",
    steps: NonNegativeInt = 200,
    lr: PositiveFloat = 0.01,
    **options: Any,
) -> Aggregate:
    """Factors (B̄+ΔB, Ā), scaling 1, with (B̄, Ā) the FedIT mean padded/truncated to `global_rank`.

    "closed": never worse than FedIT in ‖ΔW* − result‖_F; exact if lam = 0 and ΔW*'s row space
    lies in Ā's. "iterative": `steps` and `lr` drive the Adam solve of the cosine objective.
    """
    reject_options("lorafair", options)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    p = normalized_weights(updates, weights)
    B, A = padded_mean(updates, p)
    mean = Factors(B, A, 1.0)
    if global_rank is not None:
        mean = mean.truncate(global_rank)
    terms = ((pi * u.scaling, u.B, u.A) for pi, u in zip(p, updates, strict=True))
    if solver == "closed":
        correction = fair_correction(mean.B, mean.A, terms=terms, lam=lam)
    else:
        correction = fair_correction_iterative(
            mean.B, mean.A, terms=terms, lam=lam, steps=steps, lr=lr
        )
    corrected = mean.B + correction
    dtype = updates[0].B.dtype
    return Aggregate(Factors(corrected.to(dtype), mean.A.to(dtype), 1.0))
