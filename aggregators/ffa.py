"""FFA-LoRA (Sun et al., ICLR 2024): A is frozen from a shared seed, so only B is averaged.

With one A₀ of r_max rows and clients holding slices A₀[:rᵢ], Σpᵢsᵢ·BᵢA₀[:rᵢ] = (Σpᵢsᵢ·pad(Bᵢ))A₀:
zero-padded averaging of B is exact. Adapter-state semantics with A frozen (RoundSpec.freeze_A):
client j gets truncate(rⱼ, sⱼ) = (B̄[:, :rⱼ]/sⱼ, A₀[:rⱼ]) and trains B only; each sᵢ = α/rᵢ is
folded into B on the server, so the global factors have scaling 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import (
    Aggregate,
    Factors,
    NonNegativeFloat,
    RoundSpec,
    normalized_weights,
    reject_options,
)
from .registry import register


@register("ffa", rounds=RoundSpec(freeze_A=True))
def ffa(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    atol: NonNegativeFloat = 0.0,
    **options: Any,
) -> Aggregate:
    """Factors (Σpᵢsᵢ·pad(Bᵢ), A₀), scaling 1, with A₀ the shared frozen A: `state["A"]` (the
    global's A, which the server seeds with its initial one) or else the largest client's A.

    Raises ValueError if a client's A is not the matching slice of A₀ (to `atol`): then FFA's
    exactness is lost and a frozen A was not shared. Clients above A₀'s rows (a `global_rank`
    below theirs) hold zero rows past it, as they were sent. `global_rank` pads/truncates the
    result, and the state keeps the result's A (h105: without it a round without the top-rank
    client shrank the global A to the largest client's, its other rows dead ever after).
    """
    reject_options("ffa", options)
    p = normalized_weights(updates, weights)
    rank = max(u.rank for u in updates)
    frozen = None if state is None else state.get("A")
    A0 = max(updates, key=lambda u: u.rank).A if frozen is None else frozen.to(updates[0].A.dtype)
    if A0.shape[0] < rank:
        A0 = torch.cat([A0, A0.new_zeros(rank - A0.shape[0], A0.shape[1])])
    for i, u in enumerate(updates):
        if u.A.shape[1] != A0.shape[1] or not torch.allclose(
            u.A, A0[: u.rank], rtol=0.0, atol=atol
        ):
            raise ValueError(
                f"client {i}: A ({u.rank}×{u.shape[1]}) is not a slice of the shared frozen A "
                f"({A0.shape[0]}×{A0.shape[1]}); FFA needs A from one seed"
            )
    B = torch.zeros(updates[0].shape[0], A0.shape[0], dtype=torch.float64, device=A0.device)
    for pi, u in zip(p, updates, strict=True):
        B[:, : u.rank].add_(u.B, alpha=pi * u.scaling)
    mean = Factors(B.to(A0.dtype), A0.clone(), 1.0)
    out = mean if global_rank is None else mean.truncate(global_rank)
    return Aggregate(out, {} if frozen is None else {"A": out.A.to(frozen.dtype)})
