"""LoRA-Squeeze's in-tuning recipe on the client (Vulić et al., arXiv 2602.10993): train at a
higher rank for part of the round, squeeze to the target rank, finish the round at that rank.

A client whose round rank is r attaches its adapter at R = ⌈factor·r⌉ (or `train_rank`). The
global factors it receives fill the first components (rank r from round 2 on; the global's full
rank in round 1); fresh directions fill the rest (A rows drawn like peft's kaiming-uniform init,
B columns zero), so the adapter starts at the global ΔW. After k = round(fraction·steps) local
steps (at least 1, at most steps − 1) every adapted module's factors are replaced by the best
rank-r approximation of s_R·B·A, computed from the factors (`linalg.svd_factors`: thin QRs and an
R×R SVD; the d×k product is never formed), at peft's scaling α/r, and the round's remaining steps
run at rank r with a fresh optimizer at the same schedule position and data order (the `stage`
hook). The reply is a plain rank-r update: the server needs no change. With one local step the
squeeze comes after it (post hoc).

Gauge (`gauge`): the squeeze fixes the product, not its split. "start" (default) rotates the
SVD factors (B·Qᵀ, Q·A, Q orthogonal r×r: orthogonal Procrustes) so that A is closest to the A
the client started the round from, the global's first r rows: SVD signs and order differ per
client, and aggregators that average A (fedit, lorafair, squeeze's correction) would average
unaligned rows. "svd" keeps the balanced SVD split (B = U√S, A = √S·Vᵀ).

Recipe: `features: {squeeze_intune: {factor: 2, fraction: 0.5}}`; `train_rank: R` instead of
`factor` trains every client at R (above every client's rank). Reply metrics: `squeeze-rank`
(R), `squeeze-step` (k), `squeeze-kept` (share of ‖s_R·B·A‖²_F the squeeze kept, mean over
modules); metrics.jsonl rows get them as squeeze_rank, squeeze_step, squeeze_kept.

Refused: DP-SGD (privacy.mode=sample: its own trainer runs no stages), adaptive (the bandit prices
the rank it picks by the client's time), FedProx and HetLoRA's prune_lambda > 0 (regularisers built
on the rank-R tensors the squeeze replaces), and aggregators whose clients do not train the
global factors as plain adapter state (merge, local or frozen factors, or a client-side feature of
their own: fedplora, prelort, sdflora).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedllm.aggregators import Factors, round_spec
from fedllm.aggregators.linalg import split_triplets, svd_factors
from fedllm.features import registry
from fedllm.features.base import Feature, ReplyMetrics, require_adapter_state
from fedllm.features.types import ClientPlan, ClientRound, ClientUpdate
from fedllm.model.adapters import PEFT_PREFIX, read_factors

if TYPE_CHECKING:
    from fedllm.recipe.schema import RunConfig

NAME = "squeeze_intune"
KEY = f"features.{NAME}"
METRICS = ("squeeze-rank", "squeeze-step", "squeeze-kept")  # reply keys; rows use underscores


class SqueezeInTuneOptions(BaseModel):
    """`features.squeeze_intune`: the training rank (factor or train_rank), when to squeeze, and
    the gauge of the squeezed factors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    factor: float = Field(
        2.0, gt=1, allow_inf_nan=False, description="train at ⌈factor·r⌉ (> 1) for target rank r"
    )
    train_rank: int | None = Field(
        None, ge=2, description="train every client at this rank instead (above every rank)"
    )
    fraction: float = Field(
        0.5, gt=0, lt=1, allow_inf_nan=False, description="share of local steps before squeezing"
    )
    gauge: Literal["start", "svd"] = "start"


def training_rank(options: SqueezeInTuneOptions, rank: int) -> int:
    """The rank a client of target `rank` trains at before the squeeze."""
    if options.train_rank is not None:
        return options.train_rank
    return max(rank + 1, math.ceil(options.factor * rank - 1e-9))


def squeeze_step(steps: int, fraction: float) -> int:
    """The local step after which the adapter is squeezed: fraction·steps rounded half up,
    within [1, steps − 1] (with one step: after it, post hoc)."""
    if steps < 1:
        raise ValueError(f"local steps must be >= 1, got {steps}")
    return min(max(steps - 1, 1), max(1, math.floor(fraction * steps + 0.5)))


def widen(f: Factors, rank: int, *, generator: torch.Generator) -> Factors:
    """`f` with fresh components up to `rank`: A rows ~ U(±1/√k) (peft's kaiming-uniform
    init), B columns zero, so ΔW is unchanged; `f` itself when it already has `rank`."""
    extra = rank - f.rank
    if extra <= 0:
        return f
    k = f.A.shape[1]
    fresh = (torch.rand(extra, k, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(k)
    A = torch.cat([f.A, fresh.to(f.A.dtype)], dim=0)
    B = torch.cat([f.B, f.B.new_zeros(f.B.shape[0], extra)], dim=1)
    return Factors(B, A, f.scaling)


def procrustes(A: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The orthogonal Q (r×r) minimising ‖Q·A − target‖_F (both r×k; float64)."""
    P, _, Rt = torch.linalg.svd(target.double() @ A.double().T)
    return P @ Rt


def squeeze_factors(
    f: Factors, rank: int, *, scaling: float, anchor: torch.Tensor | None = None
) -> tuple[Factors, float]:
    """The best rank-`rank` factors of f.scaling·B·A at `scaling`, and the share of ‖ΔW‖²_F they
    keep; with `anchor` (rank×k), rotated so that A is closest to it (the product is the same)."""
    L, S, R = svd_factors(
        [f.B], [f.A], weights=[f.scaling], rank=f.rank, method="exact", precision="float64"
    )
    total = float((S * S).sum())
    kept = float((S[:rank] ** 2).sum() / total) if total > 0 else 1.0
    m = min(rank, S.shape[0])
    B, A = split_triplets((L[:, :m], S[:m], R[:, :m]), rank=rank)
    if anchor is not None:
        if anchor.shape != A.shape:
            raise ValueError(f"anchor {tuple(anchor.shape)} does not match A {tuple(A.shape)}")
        Q = procrustes(A, anchor)
        B, A = B @ Q.T, Q @ A
    return Factors((B / scaling).to(f.B.dtype), A.to(f.A.dtype), scaling), kept


def resize_adapter(model: torch.nn.Module, factors: Mapping[str, Factors]) -> None:
    """Replace the active adapter's lora_A/lora_B of each module by new parameters holding
    `factors` (one rank, at the scaling α/rank of the adapter's config)."""
    name = model.active_adapter
    config = model.peft_config[name]
    ranks = {f.rank for f in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"factors must share one rank, got {sorted(ranks)}")
    (rank,) = ranks
    modules = dict(model.named_modules())
    for module, f in factors.items():
        if not math.isclose(f.scaling, config.lora_alpha / rank, rel_tol=1e-9):
            raise ValueError(
                f"{module}: scaling {f.scaling} is not α/r = {config.lora_alpha}/{rank}"
            )
        layer = modules[PEFT_PREFIX + module]
        old_A, old_B = layer.lora_A[name], layer.lora_B[name]
        w = old_A.weight
        new_A = torch.nn.Linear(w.shape[1], rank, bias=False, device=w.device, dtype=w.dtype)
        new_B = torch.nn.Linear(rank, old_B.weight.shape[0], bias=False, device=w.device)
        new_B = new_B.to(old_B.weight.dtype)
        with torch.no_grad():
            new_A.weight.copy_(f.A.to(new_A.weight))
            new_B.weight.copy_(f.B.to(new_B.weight))
        layer.lora_A[name] = new_A
        layer.lora_B[name] = new_B
        layer.r[name] = rank
        layer.scaling[name] = f.scaling
    config.r = rank


@registry.register
class SqueezeInTune(Feature):
    """Clients train at a higher rank, squeeze to their own rank mid-round, and finish there."""

    name = NAME
    reply_metrics: ClassVar[ReplyMetrics] = dict(zip(METRICS, (int, int, float), strict=True))
    order = 20  # plan after tiers (10); start before pruning (40); squeeze before client DP (25)
    Options = SqueezeInTuneOptions

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Refuse a training rank at or below a client's rank, and what cannot run with it."""
        if not cls.enabled(cfg):
            return
        opts = cls.parse_options(cfg)
        if opts.train_rank is not None and "factor" in opts.model_fields_set:
            raise ValueError(f"{KEY}: give factor or train_rank, not both")
        if opts.train_rank is not None:
            p, r = max(
                ((p, cfg.client_rank(p)) for p in range(cfg.data.num_clients)), key=lambda x: x[1]
            )
            if opts.train_rank <= r:
                raise ValueError(
                    f"{KEY}.train_rank={opts.train_rank} must be above every client's rank; "
                    f"client {p} has rank {r} (set train_rank > {r}, or use factor)"
                )
        refusals = [
            (cfg.privacy.mode == "sample", "privacy.mode='sample' (DP-SGD trains in its own way)"),
            (cfg.adaptive is not None, "adaptive (the bandit prices the rank it picks by time)"),
            ("fedprox" in cfg.features, "features.fedprox (its term holds the rank-R factors)"),
            (
                cfg.aggregator.name == "hetlora"
                and (cfg.aggregator.options.get("prune_lambda") or 0) > 0,
                "aggregator.options.prune_lambda > 0 (its tail penalty holds the rank-R factors)",
            ),
            (
                round_spec(cfg.aggregator.name).freeze_A,
                f"aggregator.name={cfg.aggregator.name!r} (A stays frozen, a squeeze moves it)",
            ),
        ]
        for refused, what in refusals:
            if refused:
                raise ValueError(f"{KEY} cannot be combined with {what}; drop one of them")
        require_adapter_state(cfg, KEY)
        own = [c.name for c in registry.active(cfg) if c.own_adapter_shape]
        if own:
            raise ValueError(
                f"{KEY} cannot be combined with aggregator.name={cfg.aggregator.name!r}: its "
                f"clients train in a way of their own ({', '.join(own)}); use an adapter-state "
                "aggregator (squeeze, svd, fedit, flexlora, lorafair, hetlora, rblora)"
            )

    @classmethod
    def prepare(cls, cfg: RunConfig, *, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Every client's training rank must fit every adapted module."""
        opts = cls.parse_options(cfg)
        for p in range(cfg.data.num_clients):
            rank = training_rank(opts, cfg.client_rank(p))
            for module, (d, k) in shapes.items():
                if rank > min(d, k):
                    raise ValueError(
                        f"{KEY}: client {p} would train at rank {rank}, above module {module} of "
                        f"shape {(d, k)} (at most {min(d, k)}); lower factor or train_rank"
                    )

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.target = self.rank = 0  # this round's target and training ranks (set by `plan`)
        self.anchor: dict[str, torch.Tensor] = {}  # module -> the A the round started from
        self.kept: list[float] = []  # per module: share of ‖ΔW‖² kept by the squeeze
        self.step = 0

    # -- client --------------------------------------------------------------------------------
    def plan(self, plan: ClientPlan, rnd: ClientRound) -> ClientPlan:
        """Train at the higher rank; remember the rank to squeeze to."""
        self.target, self.rank = plan.rank, training_rank(self.options, plan.rank)
        if self.rank <= self.target:
            raise ValueError(
                f"{KEY}.train_rank={self.rank} is not above client {plan.partition}'s rank "
                f"{plan.rank}; raise train_rank or use factor"
            )
        return dataclasses.replace(plan, rank=self.rank)

    def start(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        """The received factors with fresh components up to the training rank."""
        gen = torch.Generator().manual_seed(rnd.seed)
        return {m: widen(factors[m], self.rank, generator=gen) for m in sorted(factors)}

    def stage(self, model: torch.nn.Module, rnd: ClientRound, *, done: int, steps: int) -> int:
        """Run to the squeeze step at rank R, squeeze the live adapter there, then run the rest."""
        self.step = squeeze_step(steps, self.options.fraction)
        if done == 0:  # the adapter is still the round's start: its A is the gauge's anchor
            self.anchor = {m: f.A[: self.target].double() for m, f in read_factors(model).items()}
        if done < self.step:
            return self.step - done
        if done == self.step and not self.kept:
            squeezed = self.squeeze_all(read_factors(model))
            resize_adapter(model, squeezed)
        return steps - done

    def squeeze_all(self, factors: Mapping[str, Factors]) -> dict[str, Factors]:
        """Every module squeezed to the target rank at α/r (in this round's gauge)."""
        scaling = self.cfg.client_scaling(self.target)
        out: dict[str, Factors] = {}
        self.kept = []
        for m in sorted(factors):
            anchor = self.anchor.get(m) if self.options.gauge == "start" else None
            out[m], kept = squeeze_factors(factors[m], self.target, scaling=scaling, anchor=anchor)
            self.kept.append(kept)
        return out

    def post_process(self, update: ClientUpdate, rnd: ClientRound) -> ClientUpdate:
        """The update at the target rank (squeezed now if the round had one step), and the start
        cut to it (the global's first r components)."""
        factors = update.factors
        if any(f.rank != self.target for f in factors.values()):
            factors = self.squeeze_all(factors)  # one local step: post hoc
        scaling = self.cfg.client_scaling(self.target)
        start = {m: f.truncate(self.target, scaling) for m, f in update.start.items()}
        return ClientUpdate(factors, start, self.target)

    def metrics(self) -> dict[str, int | float]:
        if not self.kept:
            return {}
        kept = sum(self.kept) / len(self.kept)
        return dict(zip(METRICS, (self.rank, self.step, kept), strict=True))
