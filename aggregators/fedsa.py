"""FedSA-LoRA (Guo et al., ICLR 2025): share A only; every client's B stays local (personalised).

Round semantics (RoundSpec.local_B): clients send only their A; the server averages A and sends it
back; each client keeps its own B across rounds (Flower's per-node `context.state`) and combines it
with the global Ā[:rⱼ]. α/r: each client's sⱼ = α/rⱼ stays with its local B (ΔWⱼ = sⱼBⱼĀ[:rⱼ]);
A carries no scaling. The server never sees B, so the global factors have B = 0: the federated
artefact is the shared Ā, and the adapters worth evaluating are the clients' personalised ones.

Mixed ranks: row j of Ā is averaged over the clients that have it (rᵢ > j), weights ∝ pᵢ, so a
high-rank client's extra rows are not shrunk by the zeros of padding (its B still multiplies them).
Equal ranks give FedSA's plain weighted mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, RoundSpec, normalized_weights, reject_options
from .registry import register


@register("fedsa", rounds=RoundSpec(local_B=True))
def fedsa(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    **options: Any,
) -> Aggregate:
    """Factors (0, Ā) with Ā[j] = Σ_{rᵢ>j} pᵢAᵢ[j] / Σ_{rᵢ>j} pᵢ; clients' B are ignored.

    `global_rank` pads/truncates Ā (default: the largest client rank).
    """
    reject_options("fedsa", options)
    p = normalized_weights(updates, weights)
    width = max(u.rank for u in updates)
    d, k = updates[0].shape
    device = updates[0].A.device
    A = torch.zeros(width, k, dtype=torch.float64, device=device)
    owners = torch.zeros(width, dtype=torch.float64, device=device)
    for pi, u in zip(p, updates, strict=True):
        A[: u.rank].add_(u.A, alpha=pi)
        owners[: u.rank] += pi
    A = torch.where(owners[:, None] > 0, A / owners.clamp_min(1e-300)[:, None], 0.0)
    dtype = updates[0].A.dtype
    shared = Factors(torch.zeros(d, width, dtype=dtype, device=device), A.to(dtype), 1.0)
    return Aggregate(shared if global_rank is None else shared.truncate(global_rank))
