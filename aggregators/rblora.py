"""RB-LoRA (EACL Findings 2026): rank-balanced averaging of heterogeneous-rank factors.

Component j is averaged only over the clients that have it (rᵢ > j): weight wⱼ ∝ 1/Σ_{i: rᵢ>j} pᵢ,
so high components are not diluted by the zeros of padding. Equal ranks reduce to FedIT.
Adapter-state semantics: client j restarts from truncate(rⱼ, sⱼ); each sᵢ = α/rᵢ is folded into
Bᵢ on the server, so the global factors have scaling 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, normalized_weights, reject_options
from .registry import register


@register("rblora")
def rblora(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    **options: Any,
) -> Aggregate:
    """B̄[:, j] = Σ_{rᵢ>j} pᵢsᵢBᵢ[:, j] / Σ_{rᵢ>j} pᵢ and Ā[j] likewise (no sᵢ), scaling 1.

    A component whose owners all have zero weight is left zero. `global_rank` pads/truncates.
    """
    reject_options("rblora", options)
    p = normalized_weights(updates, weights)
    width = max(u.rank for u in updates)
    d, k = updates[0].shape
    device = updates[0].B.device
    B = torch.zeros(d, width, dtype=torch.float64, device=device)
    A = torch.zeros(width, k, dtype=torch.float64, device=device)
    owners = torch.zeros(width, dtype=torch.float64, device=device)
    for pi, u in zip(p, updates, strict=True):
        B[:, : u.rank].add_(u.B, alpha=pi * u.scaling)
        A[: u.rank].add_(u.A, alpha=pi)
        owners[: u.rank] += pi
    balance = torch.where(owners > 0, 1.0 / owners.clamp_min(1e-300), 0.0)
    dtype = updates[0].B.dtype
    mean = Factors((B * balance).to(dtype), (balance[:, None] * A).to(dtype), 1.0)
    return Aggregate(mean if global_rank is None else mean.truncate(global_rank))
