"""LoRA-Squeeze: the exact aggregate ΔW* from the factors, squeezed to a global rank.

Optional LoRA-FAIR correction (keep the averaged Ā, correct B̄) instead of SVD factors, and optional
error feedback: the part of ΔW* the global factors miss, capped to its best rank-`residual_rank`
approximation, is kept in `state` (float32 or wider, factored) and stacked into the next round.
Adapter-state semantics: client j restarts from `global_.truncate(rⱼ, sⱼ)`. α/r: each client's
sᵢ = α/rᵢ is folded into the stacked U (ΔW* = Σpᵢsᵢ·BᵢAᵢ); the global factors have scaling 1.

Defaults, decided by `bench/quality.py` (docs/aggregators.md; SmolLM2-135M, ranks 4–32, domain
non-IID, three seeds, paired): correction ON and error feedback ON with the residual capped at the
global rank, and the rows gauge below. Together correction + residual beat the plain squeeze on
the clients' own domains by 0.019 ± 0.004 nats and tie it on the global test set; on top of the
rows gauge they still add 0.006 ± 0.004 at home. The residual costs one more rank-`global_rank`
factor pair of server state per module. `correction=False, residual_rank=0, gauge="balanced"`
gives the plain SVD squeeze (the `svd` method at rank max rᵢ).

Gauge (`gauge`): B·D, D⁻¹·A leave BA unchanged, so the split of the global factors is free and
only decides where each client's next local steps start. "rows" (the default) rescales
every non-zero row of A to norm `row_norm` (default 1/√3: the expected row norm of peft's
kaiming-uniform A, whatever its width) and B's columns inversely: clients restart with A at the
scale of a fresh initialisation (B's gradient is proportional to A). "balanced" keeps the factors
as computed (B = U√S, A = √S Vᵀ without correction; the averaged Ā with it). Measured by
`bench/quality.py` (domain regime, 3 seeds, paired): rows beat balanced by 0.008 ± 0.002 nats on
the clients' own test sets and 0.008 ± 0.006 on the global one, and by 0.021 ± 0.002 on both
without correction and residual, where the SVD split leaves A's rows at √Sⱼ. Under client-level
DP squeeze gets one update, the noised mean of the factors, so correction and residual are zero
and the gauge alone remains; it sets how the factor noise reaches ΔW, and measured there rows
ties balanced (FedIT's split), +0.005 ± 0.006 nats over 5 seeds (docs/privacy.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal, get_args

import torch

from .base import (
    Aggregate,
    Factors,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    carried_factors,
    normalized_weights,
    padded_mean,
    reject_options,
)
from .linalg import SvdMethod, split_triplets, svd_factors
from .lorafair import fair_correction
from .registry import register

STATE_KEYS = ("residual_B", "residual_A")
Gauge = Literal["balanced", "rows"]
GAUGES = get_args(Gauge)
INIT_ROW_NORM = 3**-0.5  # E‖row‖² = k·bound²/3 = 1/3 for kaiming_uniform_(a=√5), bound = 1/√k


@register("squeeze")
def squeeze(
    updates: Sequence[Factors],
    weights: Sequence[float],
    *,
    global_rank: int | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    method: SvdMethod = "auto",
    oversample: NonNegativeInt = 16,
    power_iters: NonNegativeInt = 2,
    correction: bool = True,
    lam: NonNegativeFloat = 0.01,
    residual_rank: NonNegativeInt | None = None,
    gauge: Gauge = "rows",
    row_norm: PositiveFloat = INIT_ROW_NORM,
    **options: Any,
) -> Aggregate:
    """Global factors (scaling 1), rank `global_rank` (default max rᵢ), of ΔW* + carried residual.

    `correction=True` (default) returns LoRA-FAIR factors, False the SVD-ordered best approximation
    (both before the gauge). A new residual is kept when `residual_rank` > 0 (default None: the
    global rank); a residual in `state` is always stacked in. `gauge` picks the split of the global
    factors (see the module docstring); it never changes their product.
    """
    reject_options("squeeze", options)
    _check_gauge(gauge, row_norm)
    p = normalized_weights(updates, weights)
    rank = max(u.rank for u in updates) if global_rank is None else global_rank
    residual_rank = rank if residual_rank is None else residual_rank
    if residual_rank < 0:
        raise ValueError(f"residual_rank must be >= 0, got {residual_rank}")
    Bs = [u.B for u in updates]
    As = [u.A for u in updates]
    ws = [pi * u.scaling for pi, u in zip(p, updates, strict=True)]
    carried = carried_factors(
        state, updates[0].shape, keys=STATE_KEYS, method="squeeze", what="residual"
    )
    if carried is not None:
        Bs, As, ws = [*Bs, carried[0]], [*As, carried[1]], [*ws, 1.0]
    # The sketch's precision follows the clients' factors, not the float64 correction term.
    precision = "float64" if updates[0].B.dtype == torch.float64 else "mixed"
    decompose = partial(
        svd_factors,
        method=method,
        oversample=oversample,
        power_iters=power_iters,
        seed=seed,
        precision=precision,
    )

    if correction:
        mean = Factors(*padded_mean(updates, p), 1.0).truncate(rank)
        terms = zip(ws, Bs, As, strict=True)
        B, A = mean.B + fair_correction(mean.B, mean.A, terms=terms, lam=lam), mean.A
        # What the corrected factors miss is [U | −B][V; A]: squeeze that to the cap.
        tail = (
            decompose([*Bs, B], [*As, A], weights=[*ws, -1.0], rank=residual_rank)
            if residual_rank
            else None
        )
    else:
        L, S, R = decompose(Bs, As, weights=ws, rank=rank + residual_rank)
        B, A = split_triplets((L[:, :rank], S[:rank], R[:, :rank]), rank=rank)
        tail = (L[:, rank:], S[rank:], R[:, rank:]) if residual_rank else None

    dtype = updates[0].B.dtype
    new_state: dict[str, torch.Tensor] = {}
    if tail is not None:
        kept = torch.promote_types(dtype, torch.float32)
        rB, rA = split_triplets(tail, rank=residual_rank)
        new_state = {"residual_B": rB.to(kept), "residual_A": rA.to(kept)}
    if gauge == "rows":
        B, A = rows_gauge(B, A, row_norm=row_norm)
    return Aggregate(Factors(B.to(dtype), A.to(dtype), 1.0), new_state)


def rows_gauge(
    B: torch.Tensor, A: torch.Tensor, *, row_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B·D⁻¹, D·A) with D = diag(row_norm/‖Aⱼ‖): every non-zero row of A at `row_norm`, BA kept."""
    norms = A.double().norm(dim=1)
    scale = torch.where(norms > 0, row_norm / norms.clamp_min(1e-300), 1.0)
    return B.double() / scale[None, :], A.double() * scale[:, None]


def _check_gauge(gauge: str, row_norm: float) -> None:
    if gauge not in GAUGES:
        raise ValueError(f"aggregator.options.gauge must be one of {list(GAUGES)}, got {gauge!r}")
    if not (math.isfinite(row_norm) and row_norm > 0):
        raise ValueError(f"aggregator.options.row_norm must be a finite number > 0, got {row_norm}")
