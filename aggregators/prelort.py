"""PreLort (Waseem et al., arXiv 2606.15963, June 2026): prefix-nested LoRA, segment-wise averaging.

The rank dimensions are a prefix hierarchy cut by the clients' ranks: with ranks 4, 8, 16 the
segments are [0, 4), [4, 8) and [8, 16). Each segment of B's columns and A's rows is averaged only
over the clients that hold it (rᵢ ≥ its end), weights ∝ pᵢ renormalised within the segment, so a
high-rank client's extra dimensions are not shrunk by the zeros a padded low-rank client would add
(FedIT/HetLoRA's dilution). Per segment that is FedIT's per-factor mean, with its cross terms.

The other half of the method is on the clients: each adapter is trained under several rank
truncations so that the useful signal gathers in the low-rank prefix, the part every client gets
(`fedllm.features.prelort_nested`; client option `nested`, default on). Adapter-state rounds:
client j restarts from `global_.truncate(rⱼ, sⱼ)`; each sᵢ = α/rᵢ is folded into Bᵢ on the server,
so the global factors have scaling 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, RoundSpec, normalized_weights, reject_options
from .registry import register

# read by the clients only (fedllm.features.prelort_nested): option -> its default there
CLIENT_DEFAULTS: dict[str, Any] = {"nested": True}
CLIENT_OPTIONS = tuple(CLIENT_DEFAULTS)


@register(
    "prelort",
    rounds=RoundSpec(client_options=CLIENT_OPTIONS, client_defaults=CLIENT_DEFAULTS),
)
def prelort(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    **options: Any,
) -> Aggregate:
    """Segment-wise means, scaling 1: B̄[:, j] = Σ_{rᵢ>j} pᵢsᵢBᵢ[:, j] / Σ_{rᵢ>j} pᵢ, Ā[j] alike.

    `global_rank` pads/truncates the result (default: the largest client rank).
    """
    reject_options("prelort", options)
    p = normalized_weights(updates, weights)
    width = max(u.rank for u in updates)
    (d, k), device = updates[0].shape, updates[0].B.device
    B = torch.zeros(d, width, dtype=torch.float64, device=device)
    A = torch.zeros(width, k, dtype=torch.float64, device=device)
    owners = torch.zeros(width, dtype=torch.float64, device=device)
    for pi, u in zip(p, updates, strict=True):
        B[:, : u.rank].add_(u.B, alpha=pi * u.scaling)
        A[: u.rank].add_(u.A, alpha=pi)
        owners[: u.rank] += pi
    held = owners > 0  # a dimension no weighted client holds stays zero
    scale = torch.where(held, 1.0 / owners.clamp_min(1e-300), 0.0)
    dtype = updates[0].B.dtype
    mean = Factors((B * scale).to(dtype), (A * scale[:, None]).to(dtype), 1.0)
    return Aggregate(mean if global_rank is None else mean.truncate(global_rank))


def segments(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """The rank segments [start, end) the clients' ranks cut (each averaged over its holders)."""
    cuts = sorted({int(r) for r in ranks if r > 0})
    return list(zip([0, *cuts[:-1]], cuts, strict=True))
