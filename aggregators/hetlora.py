"""HetLoRA (Cho et al., 2024): zero-padded factor averaging weighted by each update's size.

Weights are pᵢ·‖sᵢBᵢAᵢ‖_F, normalised; the norm comes from r×r Gram matrices, never d×k. Like FedIT
it is biased by cross terms. Adapter-state semantics: client j restarts from truncate(rⱼ, sⱼ)
(sᵢ = α/rᵢ folded into Bᵢ; global scaling 1). The client-side rank self-pruning regulariser is
not part of aggregation: its options (`CLIENT_OPTIONS`) travel to clients in the round config
(RoundSpec.client_options) and never reach this function (fedllm.features.hetlora_prune).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, RoundSpec, normalized_weights, padded_mean, reject_options
from .registry import register


def delta_norm(f: Factors) -> float:
    """‖s·B@A‖_F from the factors: ‖BA‖_F² = trace((BᵀB)(AAᵀ)) = Σ (BᵀB)⊙(AAᵀ)."""
    B, A = f.B.double(), f.A.double()
    squared = ((B.T @ B) * (A @ A.T)).sum().clamp_min(0.0).item()
    return f.scaling * math.sqrt(squared)


# the rank self-pruning options, used by clients only (fedllm.features.hetlora_prune), and their
# defaults there (λ = 0: off)
CLIENT_DEFAULTS: dict[str, Any] = {"prune_lambda": 0.0, "prune_gamma": 0.1, "min_rank": 1}
CLIENT_OPTIONS = tuple(CLIENT_DEFAULTS)


@register(
    "hetlora",
    rounds=RoundSpec(client_options=CLIENT_OPTIONS, client_defaults=CLIENT_DEFAULTS),
)
def hetlora(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    **options: Any,
) -> Aggregate:
    """FedIT with weights ∝ pᵢ·‖sᵢBᵢAᵢ‖_F (plain pᵢ if every update is zero), scaling 1.

    `global_rank` pads/truncates the result.
    """
    reject_options("hetlora", options)
    p = normalized_weights(updates, weights)
    sized = [pi * delta_norm(u) for pi, u in zip(p, updates, strict=True)]
    total = math.fsum(sized)
    q = [w / total for w in sized] if total > 0 else p
    B, A = padded_mean(updates, q)
    dtype = updates[0].B.dtype
    mean = Factors(B.to(dtype), A.to(dtype), 1.0)
    return Aggregate(mean if global_rank is None else mean.truncate(global_rank))
