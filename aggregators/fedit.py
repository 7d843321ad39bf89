"""FedIT: per-factor weighted mean of B and A, zero-padded to the largest rank.

Biased: (Σpᵢsᵢ·Bᵢ)(ΣpⱼAⱼ) = ΔW* + Σ_{i≠j} pᵢpⱼsᵢ·BᵢAⱼ, so the cross terms BᵢAⱼ leak in.
Adapter-state semantics: client j restarts from truncate(rⱼ, sⱼ); each sᵢ = α/rᵢ is folded into
Bᵢ on the server, so the global factors have scaling 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, normalized_weights, padded_mean, reject_options
from .registry import register


@register("fedit")
def fedit(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    **options: Any,
) -> Aggregate:
    """B̄ = Σpᵢsᵢ·pad(Bᵢ), Ā = Σpᵢ·pad(Aᵢ), scaling 1 (each client's scaling folded into its B).

    With one shared scaling s this is standard FedIT. `global_rank` pads/truncates the result.
    """
    reject_options("fedit", options)
    B, A = padded_mean(updates, normalized_weights(updates, weights))
    dtype = updates[0].B.dtype
    mean = Factors(B.to(dtype), A.to(dtype), 1.0)
    return Aggregate(mean if global_rank is None else mean.truncate(global_rank))
