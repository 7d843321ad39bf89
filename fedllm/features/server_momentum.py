"""Server momentum (FedAvgM, Hsu et al. 2019) on the aggregated update, kept in factored form.

With the old global ΔW_old and the aggregator's new global ΔW_agg (ΔW = s·B·A per module):
    Δ = ΔW_agg − ΔW_old,   v ← β·v + Δ,   new global = ΔW_old + η·v.
No d×k matrix is formed: every sum is a stack of factors ([s₁B₁ | −s₂B₂ | …] times [A₁; A₂; …]),
re-factored by the SVD of `aggregators.linalg.svd_factors` (exact or randomized). The velocity is
kept as factors capped to its best rank-`rank` approximation (like squeeze's residual), in float32
or wider; the new global is the best rank-r approximation of ΔW_old + η·(β·v + Δ), with r and s
those of the aggregator's result, computed from the uncapped velocity (the cap only limits what
is carried to the next round). The global comes back SVD-ordered, so a client's cut to its rank
is the best approximation at that rank. β = 0, η = 1 gives back the aggregate (re-factored).
The re-factoring is the balanced SVD split (B = U√S, A = √S Vᵀ): an aggregator's own split of
the same product (squeeze's `gauge: rows`, its corrected Ā) does not survive momentum.

Recipe: `features: {server_momentum: {beta: 0.9, rank: null, server_lr: 1.0}}` — β in [0, 1)
(default 0.9, the paper's usual value), `rank` ≥ 1 caps the velocity (default: the rank of the
new global, per module and round), η = `server_lr` > 0 (default 1.0: plain FedAvgM).
Composes with any adapter-state aggregator; refused with flora (merge: the global is a delta
already in the base), fedsa (local_B: the server holds A only) and ffa (freeze_A: re-factoring
would move the shared frozen A). Allowed with client-level DP and SecAgg+: momentum only
post-processes the released aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedllm.aggregators import Factors, round_spec
from fedllm.aggregators.linalg import split_triplets, svd_factors
from fedllm.features.base import Feature
from fedllm.features.registry import register

if TYPE_CHECKING:
    from fedllm.recipe.schema import RunConfig

# RoundSpec flags under which the global is not the whole adapter's factors -> why
REFUSED = {
    "merge": "merges each round into the base (the global is not adapter state)",
    "local_B": "keeps B on the clients (the server holds A only)",
    "freeze_A": "freezes the shared A (re-factoring the global would move it)",
}


class ServerMomentumOptions(BaseModel):
    """`features.server_momentum`: momentum β, velocity rank cap, server learning rate η."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    beta: float = Field(0.9, ge=0, lt=1, description="momentum β in [0, 1)")
    rank: int | None = Field(None, ge=1, description="velocity rank cap (default: global rank)")
    server_lr: float = Field(1.0, gt=0, allow_inf_nan=False, description="server step η > 0")


def momentum_step(
    old: Factors,
    new: Factors,
    *,
    velocity: Factors | None,
    beta: float,
    lr: float = 1.0,
    rank: int | None = None,
    method: str = "auto",
    seed: int = 0,
) -> tuple[Factors, Factors]:
    """One FedAvgM step on one module: (new global at `new`'s rank and scaling, capped velocity).

    `velocity` None is zero (the first round); the velocity has scaling 1 and rank `rank`
    (default `new.rank`). Inputs are never mutated.
    """
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    cap = new.rank if rank is None else rank
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    for which, f in (("old", old), ("velocity", velocity)):
        if f is not None and f.shape != new.shape:
            raise ValueError(f"{which} is {f.shape} but the new global is {new.shape}")
    carried = [] if velocity is None else [(velocity, beta)]
    # v' = β·v + ΔW_agg − ΔW_old;  global = ΔW_old + η·v' = η·β·v + η·ΔW_agg + (1 − η)·ΔW_old
    v_terms = [*carried, (new, 1.0), (old, -1.0)]
    g_terms = [(f, lr * w) for f, w in carried] + [(new, lr), (old, 1.0 - lr)]
    vB, vA = _refactor(v_terms, cap, method=method, seed=seed)
    gB, gA = _refactor(g_terms, new.rank, method=method, seed=seed)
    kept = torch.promote_types(new.B.dtype, torch.float32)
    dtype = new.B.dtype
    global_ = Factors((gB / new.scaling).to(dtype), gA.to(dtype), new.scaling)
    return global_, Factors(vB.to(kept), vA.to(kept), 1.0)


def _refactor(
    terms: Sequence[tuple[Factors, float]], rank: int, *, method: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 factors (B d×rank, A rank×k, SVD-ordered) of the best rank-`rank` Σ wᵢ·ΔWᵢ.

    Zero-weight terms (β = 0, η = 1) are left out: they cost work and add nothing.
    """
    live = [(f, w) for f, w in terms if w != 0]
    L, S, R = svd_factors(
        [f.B for f, _ in live],
        [f.A for f, _ in live],
        weights=[w * f.scaling for f, w in live],
        rank=rank,
        method=method,
        seed=seed,
    )
    return split_triplets((L, S, R), rank=rank)


@register
class ServerMomentum(Feature):
    """FedAvgM on the global LoRA factors; the per-module velocity is checkpointed."""

    name = "server_momentum"
    order = 80  # after other after_aggregate hooks: momentum acts on the final aggregate
    Options = ServerMomentumOptions

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.velocity: dict[str, Factors] = {}

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Refuse aggregators whose global is not the whole adapter's factors."""
        if not cls.enabled(cfg):
            return
        name = cfg.aggregator.name
        spec = round_spec(name)
        for flag, why in REFUSED.items():
            if getattr(spec, flag):
                raise ValueError(
                    f"features.server_momentum cannot wrap aggregator.name={name!r}: it {why}; "
                    "use an adapter-state aggregator (e.g. svd, fedit, squeeze)"
                )

    def after_aggregate(
        self,
        old: Mapping[str, Factors],
        new: dict[str, Factors],
        *,
        server_round: int,
    ) -> dict[str, Factors]:
        """The momentum-stepped global per module; the velocity moves on to this round's."""
        missing = sorted(set(new) - set(old))
        if missing:
            raise ValueError(f"server_momentum: no old global for modules {missing}")
        opts = self.options
        out: dict[str, Factors] = {}
        velocity: dict[str, Factors] = {}
        for module in sorted(new):
            out[module], velocity[module] = momentum_step(
                old[module],
                new[module],
                velocity=self.velocity.get(module),
                beta=opts.beta,
                lr=opts.server_lr,
                rank=opts.rank,
                seed=self.cfg.seed + server_round,
            )
        self.velocity = velocity
        return out

    def state_dict(self) -> dict[str, Any]:
        """The velocity factors per module (tensors only, for torch.save)."""
        return {"velocity": {m: {"B": v.B, "A": v.A} for m, v in self.velocity.items()}}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore `state_dict`'s velocity (None: start from zero velocity)."""
        kept = (state or {}).get("velocity", {})
        self.velocity = {m: Factors(v["B"], v["A"], 1.0) for m, v in kept.items()}
