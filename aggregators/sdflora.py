"""SDFLoRA (Shen, Lu, Wan & Chen, arXiv 2601.11219, Jan 2026): a shared global module and a private
local one per client; only the global module is aggregated, and DP noise touches only it.

Each client's adapter of rank rᵢ is two LoRA modules side by side: a global module of rank
r_gᵢ = rᵢ − r_lᵢ (the first components) and a local module of rank r_lᵢ = ⌊f·rᵢ⌋ (client option
`local_fraction` f, default 0.5), ΔWᵢ = s(B_g A_g + B_l A_l). The local module never leaves the
client (`fedllm.features.sdflora_local` keeps it in the node's state); the reply is the global
module alone, so under `privacy.mode: client` the clipping and noise act on it only, the paper's
"noise exclusively on the global module". The server aggregates the heterogeneous-rank global
modules by weighted stacking, U = [p₁s₁B_g₁ | …], V = [A_g₁; …] (UV = Σpᵢsᵢ·B_gᵢA_gᵢ exactly), and
recompresses UV by SVD to the global rank (default: the largest global-module rank). Clients
restart their global module from the best rank-r_gᵢ approximation of it (adapter-state rounds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Aggregate, Factors, NonNegativeInt, RoundSpec, reject_options
from .linalg import SvdMethod
from .registry import register
from .svd import svd

# read by the clients only (fedllm.features.sdflora_local): option -> its default there
CLIENT_DEFAULTS: dict[str, Any] = {"local_fraction": 0.5}
CLIENT_OPTIONS = tuple(CLIENT_DEFAULTS)


@register(
    "sdflora",
    rounds=RoundSpec(client_options=CLIENT_OPTIONS, client_defaults=CLIENT_DEFAULTS),
)
def sdflora(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    method: SvdMethod = "auto",
    oversample: NonNegativeInt = 16,  # as svd and squeeze: within 1.01x optimal in float32
    power_iters: NonNegativeInt = 2,
    **options: Any,
) -> Aggregate:
    """SVD-ordered factors (scaling 1) of the stacked Σpᵢsᵢ·BᵢAᵢ at `global_rank` (default max rᵢ).

    `updates` are the clients' global modules; `method`, `oversample`, `power_iters` go to
    `factored_svd` ("exact" is exact up to the truncation).
    """
    reject_options("sdflora", options)
    rank = max((u.rank for u in updates), default=0) if global_rank is None else global_rank
    return svd(
        updates,
        weights,
        global_rank=rank,
        seed=seed,
        method=method,
        oversample=oversample,
        power_iters=power_iters,
    )


def split_ranks(rank: int, local_fraction: float) -> tuple[int, int]:
    """(global, local) ranks of a client of `rank`: local ⌊f·rank⌋, global the rest (≥ 1)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not 0 <= local_fraction < 1:
        raise ValueError(
            f"aggregator.options.local_fraction: must be in [0, 1), got {local_fraction}"
        )
    local = int(local_fraction * rank + 1e-9)
    local = min(local, rank - 1)
    return rank - local, local
