"""FlexLoRA (Bai et al., NeurIPS 2024): form ΔW* densely, full SVD, redistribute the top-rⱼ part.

The dense baseline the factored routes (`svd`, `squeeze`) must beat: it materialises the d×k
matrix ΔW* = Σpᵢsᵢ·BᵢAᵢ (float64, one client at a time) and calls torch.linalg.svd on it.
Adapter-state semantics: client j restarts from `global_.truncate(rⱼ, sⱼ)`, the best rank-rⱼ
approximation of ΔW*; each sᵢ = α/rᵢ enters ΔW* and the global factors have scaling 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, normalized_weights, reject_options
from .linalg import split_triplets
from .registry import register


def dense_delta(updates: Sequence[Factors], p: Sequence[float]) -> torch.Tensor:
    """ΔW* = Σpᵢsᵢ·BᵢAᵢ as a dense float64 d×k matrix, accumulated one client at a time."""
    d, k = updates[0].shape
    delta = torch.zeros(d, k, dtype=torch.float64, device=updates[0].B.device)
    for pi, u in zip(p, updates, strict=True):
        delta.addmm_(u.B.double(), u.A.double(), alpha=pi * u.scaling)
    return delta


@register("flexlora")
def flexlora(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    **options: Any,
) -> Aggregate:
    """Top-`global_rank` SVD factors of dense ΔW* (default min(Σrᵢ, d, k): lossless), scaling 1."""
    reject_options("flexlora", options)
    p = normalized_weights(updates, weights)
    d, k = updates[0].shape
    rank = min(sum(u.rank for u in updates), d, k) if global_rank is None else global_rank
    L, S, Rt = torch.linalg.svd(dense_delta(updates, p), full_matrices=False)
    m = min(rank, S.shape[0])
    B, A = split_triplets((L[:, :m], S[:m], Rt[:m].T), rank=rank)
    dtype = updates[0].B.dtype
    return Aggregate(Factors(B.to(dtype), A.to(dtype), 1.0))
