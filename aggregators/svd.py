"""Exact aggregate ΔW* = Σpᵢsᵢ·BᵢAᵢ as SVD-ordered factors (FlexLoRA's result, never forming d×k).

Adapter-state semantics: client j restarts from `global_.truncate(rⱼ, sⱼ)`, the best rank-rⱼ
approximation of ΔW* (Eckart–Young); the discarded tail is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, NonNegativeInt, normalized_weights, reject_options
from .linalg import SvdMethod, numerical_rank, split_triplets, svd_factors
from .registry import register


@register("svd")
def svd(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    method: SvdMethod = "auto",
    oversample: NonNegativeInt = 16,
    power_iters: NonNegativeInt = 2,
    **options: Any,
) -> Aggregate:
    """Best rank-`global_rank` factors of ΔW* (default: its numerical rank, at most Σrᵢ and
    min(d, k)), scaling 1.

    By default components at numerical zero are dropped: clients that sent the same direction,
    a zero factor, or a pruned round's fill (which re-adds the global's rank every round) would
    otherwise grow the global's rank with zeros. `method`, `oversample`, `power_iters` go to
    `svd_factors` ("exact" with rank ≥ Σrᵢ is exact).
    """
    reject_options("svd", options)
    p = normalized_weights(updates, weights)
    d, k = updates[0].shape
    rank = min(sum(u.rank for u in updates), d, k) if global_rank is None else global_rank
    L, S, R = svd_factors(
        [u.B for u in updates],
        [u.A for u in updates],
        weights=[pi * u.scaling for pi, u in zip(p, updates, strict=True)],
        rank=rank,
        method=method,
        oversample=oversample,
        power_iters=power_iters,
        seed=seed,
    )
    dtype = updates[0].B.dtype
    if global_rank is None:
        rank = numerical_rank(S, dtype)
        L, S, R = L[:, :rank], S[:rank], R[:, :rank]
    B, A = split_triplets((L, S, R), rank=rank)
    return Aggregate(Factors(B.to(dtype), A.to(dtype), 1.0))
