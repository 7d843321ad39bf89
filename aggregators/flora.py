"""FLoRA (Wang et al., NeurIPS 2024): exact aggregation by stacking; merge and re-initialise.

Round semantics (RoundSpec.merge): each round every client trains a FRESH LoRA on top of the base
plus the merged delta so far, and sends it. The server stacks the round's updates,
U = [p₁s₁B₁ | …], V = [A₁; …], so UV = ΔW* exactly (each client's own sᵢ = α/rᵢ folded into U,
never one α/max r for all: the trap of FLoRA's repo issue #16), and adds them to the merged delta
carried in `state`. The global factors are that accumulated delta (scaling 1), which clients add to
their base weights before training and the final PEFT adapter carries as an ordinary LoRA.

The accumulated stack is kept as SVD-ordered factors from the exact factored SVD (QR of the thin
factors, never d×k), dropping numerically-zero directions: lossless, so its rank, and with it the
download, stays ≤ min(d, k) instead of growing by Σrᵢ every round. `global_rank` caps it (lossy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, RoundSpec, carried_factors, normalized_weights, reject_options
from .linalg import numerical_rank, split_triplets, svd_factors
from .registry import register

STATE_KEYS = ("merged_B", "merged_A")


@register("flora", rounds=RoundSpec(merge=True))
def flora(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    **options: Any,
) -> Aggregate:
    """Merged delta so far + Σpᵢsᵢ·BᵢAᵢ as SVD-ordered factors (scaling 1), also kept in `state`.

    Exact unless `global_rank` is below the numerical rank of the accumulated delta.
    """
    reject_options("flora", options)
    p = normalized_weights(updates, weights)
    Bs = [u.B for u in updates]
    As = [u.A for u in updates]
    ws = [pi * u.scaling for pi, u in zip(p, updates, strict=True)]
    merged = carried_factors(
        state, updates[0].shape, keys=STATE_KEYS, method="flora", what="merged delta"
    )
    if merged is not None:
        Bs, As, ws = [*Bs, merged[0]], [*As, merged[1]], [*ws, 1.0]
    d, k = updates[0].shape
    cap = min(d, k) if global_rank is None else global_rank
    L, S, R = svd_factors(Bs, As, weights=ws, rank=cap, method="exact", seed=seed)
    dtype = updates[0].B.dtype
    rank = numerical_rank(S, dtype)
    B, A = split_triplets((L[:, :rank], S[:rank], R[:, :rank]), rank=rank)
    kept = torch.promote_types(dtype, torch.float32)
    new_state = {"merged_B": B.to(kept), "merged_A": A.to(kept)}
    return Aggregate(Factors(B.to(dtype), A.to(dtype), 1.0), new_state)
