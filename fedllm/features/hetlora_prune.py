"""HetLoRA's client-side rank self-pruning (Cho et al., 2024), as pure functions plus state helpers.

During local training the client adds λ·Σ_modules ‖B[:, r−t:r]‖_F·‖A[r−t:r, :]‖_F to its loss: the
norms of the tail t = ⌊γr⌋ rank components (at least one, at most r−1). After training it prunes
its rank to max(min_rank, r−t) if that tail value (computed on the trained factors) is below the
value it recorded after the previous round's training; the first round only records it. Tails
are compared at one rank: after a prune the client records the pruned factors' own tail (the
pre-prune tail measured other components at another scaling), and a value recorded at another
rank than the round's only records again. A pruned client trains and sends at the smaller rank
from then on: the rank and the last tail value persist in the node's `context.state`, and the
server, which cuts the global factors to the rank a client last reported, needs no change
(zero-padded averaging takes any rank). The client also writes
them into its own folder (`features.node_state.save_node_state`: `clients/<p>/node_state/`, or the
node's `personal-dir`), and a node whose state has none (a resumed simulation's new process) takes
them back before it plans its round. They are read from the update a client sends (noised
first under client-level DP); were that update raw (`features.personal.raw_update`), only a
node's own `personal-dir` would keep them, never the run directory.

Options (recipe `aggregator.options` of `hetlora`, sent to clients in the round config; never
passed to the server's aggregation): `prune_lambda` λ ≥ 0 (0: off, the default), `prune_gamma`
γ in (0, 1) (0.1) and `min_rank` ≥ 1 (1).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ConfigRecord, RecordDict

from fedllm.aggregators.base import Factors
from fedllm.aggregators.hetlora import CLIENT_DEFAULTS
from fedllm.aggregators.hetlora import CLIENT_OPTIONS as OPTIONS
from fedllm.features.base import Feature, Regularizer, ReplyMetrics
from fedllm.features.node_state import restore_node_state, save_node_state
from fedllm.features.personal import raw_update
from fedllm.features.registry import register
from fedllm.features.types import (
    ClientPlan,
    ClientRound,
    ClientUpdate,
)
from fedllm.model.adapters import live_lora
from fedllm.model.wire import client_options
from fedllm.recipe.schema import RunConfig
from fedllm.suggest import did_you_mean

STATE = "hetlora-prune"  # key of {rank, tail} in the node's context.state
TAIL = "hetlora-tail"  # the reply metric: the tail value after local training


@dataclass(frozen=True)
class PruneOptions:
    """The rank self-pruning settings; `active` only when λ > 0."""

    prune_lambda: float = CLIENT_DEFAULTS["prune_lambda"]
    prune_gamma: float = CLIENT_DEFAULTS["prune_gamma"]
    min_rank: int = CLIENT_DEFAULTS["min_rank"]

    @property
    def active(self) -> bool:
        """Whether self-pruning is on: `prune_lambda` (λ) > 0."""
        return self.prune_lambda > 0


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"aggregator.options.{name}: must be a finite number, got {value!r}")
    return float(value)


def parse_options(options: Mapping[str, Any]) -> PruneOptions:
    """Validated options (missing ones at their defaults); errors name the option."""
    default = PruneOptions()
    lam = _real("prune_lambda", options.get("prune_lambda", default.prune_lambda))
    if lam < 0:
        raise ValueError(f"aggregator.options.prune_lambda: must be >= 0, got {lam!r}")
    gamma = _real("prune_gamma", options.get("prune_gamma", default.prune_gamma))
    if not 0 < gamma < 1:
        raise ValueError(f"aggregator.options.prune_gamma: must be in (0, 1), got {gamma!r}")
    min_rank = options.get("min_rank", default.min_rank)
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"aggregator.options.min_rank: must be an integer >= 1, got {min_rank!r}")
    return PruneOptions(lam, gamma, min_rank)


def check_recipe(cfg: RunConfig) -> None:
    """Recipe checks: valid options, no unsupported combinations."""
    if cfg.aggregator.name != "hetlora":
        return
    unknown = sorted(set(cfg.aggregator.options) - set(OPTIONS))
    if unknown:  # hetlora's aggregation takes no options of its own
        hint = did_you_mean(unknown[0], OPTIONS)
        raise ValueError(
            f"aggregator.options.{unknown[0]}: unknown option of 'hetlora'{hint}; "
            f"valid: {', '.join(OPTIONS)}"
        )
    opts = parse_options({k: v for k, v in cfg.aggregator.options.items() if k in OPTIONS})
    if not opts.active:
        return
    if cfg.privacy.mode == "sample":
        raise ValueError(
            "aggregator.options.prune_lambda > 0 (HetLoRA rank self-pruning) is not supported "
            "with privacy.mode='sample' (DP-SGD has no regulariser hook); set prune_lambda: 0"
        )
    if cfg.privacy.mode == "client" and cfg.privacy.noise_at == "server":
        raise ValueError(
            "aggregator.options.prune_lambda > 0 (HetLoRA rank self-pruning) is not supported "
            "with privacy.mode='client' and noise_at='server': the rank a client keeps is read "
            "from its raw update and sent in the clear, outside the guarantee; use "
            "privacy.noise_at='client' (pruning then reads the noised update) or prune_lambda: 0"
        )
    if cfg.compression.topk is not None:
        raise ValueError(
            "aggregator.options.prune_lambda > 0 cannot be combined with compression.topk "
            "(the top-k residual is kept at the old rank); drop one of them"
        )


def tail_size(rank: int, gamma: float) -> int:
    """t = ⌊γr⌋ tail components, at least 1 and at most r−1 (0 for r = 1)."""
    if rank <= 1:
        return 0
    return min(rank - 1, max(1, math.floor(gamma * rank + 1e-9)))


def lora_pairs(source: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module → (B, A): the live (differentiable) weights of a peft model's active adapter, or
    the tensors of a mapping of `Factors` / (B, A) pairs."""
    if isinstance(source, torch.nn.Module):
        return live_lora(source)
    return {m: (f.B, f.A) if isinstance(f, Factors) else (f[0], f[1]) for m, f in source.items()}


def tail_penalty(source: Any, gamma: float) -> torch.Tensor:
    """Σ_modules ‖B[:, r−t:]‖_F·‖A[r−t:, :]‖_F (t = `tail_size(r, γ)`), a differentiable scalar."""
    total: torch.Tensor | None = None
    for B, A in lora_pairs(source).values():
        r = A.shape[0]
        t = tail_size(r, gamma)
        if t == 0:
            continue
        term = torch.linalg.vector_norm(B[:, r - t :]) * torch.linalg.vector_norm(A[r - t :])
        total = term if total is None else total + term
    return torch.zeros(()) if total is None else total


@dataclass(frozen=True)
class Pruned:
    """`maybe_prune`'s result: the rank to send, the factors at that rank, the tail value."""

    rank: int
    factors: dict[str, Factors]
    value: float
    pruned: bool


def maybe_prune(
    factors: Mapping[str, Factors],
    prev_value: float | None,
    *,
    gamma: float,
    min_rank: int,
    scaling: Callable[[int], float] | None = None,
) -> Pruned:
    """Cut to max(min_rank, r−t) if the tail value is below `prev_value` (never on the first
    round, `prev_value` None). `scaling(rank)` gives the new scaling (B is rescaled so the kept
    components' ΔW is unchanged); default: each module keeps its own."""
    ranks = {f.rank for f in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"factors of one client must share one rank, got {sorted(ranks)}")
    (rank,) = ranks
    value = float(tail_penalty(factors, gamma))
    new_rank = max(min_rank, rank - tail_size(rank, gamma))
    if prev_value is None or not value < prev_value or new_rank >= rank:
        return Pruned(rank, dict(factors), value, False)
    out = {
        m: f.truncate(new_rank, None if scaling is None else scaling(new_rank))
        for m, f in factors.items()
    }
    return Pruned(new_rank, out, value, True)


# -- the client's round (used by fedllm.client.app.train) -------------------------------------


def options_of(config: ConfigRecord) -> PruneOptions:
    """The options the server sent in the round config (off if it sent none)."""
    return parse_options(client_options(config))


def remembered(state: RecordDict) -> tuple[int | None, float | None]:
    """(pruned rank, last tail value at that rank) kept in this node's state, or None for
    either. A value without its rank ("tail-rank", since stop 48) was written after a prune
    before then, when the pre-prune tail was kept: it is not the rank's, so None (h103)."""
    kept = state.get(STATE)
    if not isinstance(kept, ConfigRecord):
        return None, None
    rank = int(kept["rank"])
    same = "tail-rank" in kept and int(kept["tail-rank"]) == rank
    return rank, float(kept["tail"]) if same else None


def planned(plan: ClientPlan, state: RecordDict) -> ClientPlan:
    """The client plan with its rank lowered to the one this node pruned to (if it did)."""
    rank, _ = remembered(state)
    if rank is None or rank >= plan.rank:
        return plan
    return dataclasses.replace(plan, rank=rank)


def regularizer(
    model: torch.nn.Module, opts: PruneOptions, *, rank: int
) -> Callable[[], torch.Tensor] | None:
    """λ·tail_penalty on the live adapter, or None when off or the rank cannot shrink."""
    if not opts.active or rank <= opts.min_rank:
        return None
    return lambda: opts.prune_lambda * tail_penalty(model, opts.prune_gamma)


def prune_reply(
    factors: Mapping[str, Factors],
    start: Mapping[str, Factors],
    *,
    opts: PruneOptions,
    state: RecordDict,
    rank: int,
    scaling: Callable[[int], float],
) -> tuple[dict[str, Factors], dict[str, Factors], int, dict[str, float]]:
    """After local training at `rank`: maybe prune (factors and `start` alike), remember the rank
    and the tail value at that rank in `state` (after a prune: the pruned factors' own tail), so
    each round compares tails of one rank; a value remembered at another rank only records.

    Returns (factors, start, rank to send, metrics); unchanged and no metrics when pruning is off.
    """
    if not opts.active:
        return dict(factors), dict(start), rank, {}
    kept_rank, prev = remembered(state)
    if kept_rank != rank:  # a value at another rank measured other components: not comparable
        prev = None
    gamma, min_rank = opts.prune_gamma, opts.min_rank
    result = maybe_prune(factors, prev, gamma=gamma, min_rank=min_rank, scaling=scaling)
    value = result.value
    if result.pruned:
        start = {m: f.truncate(result.rank, scaling(result.rank)) for m, f in start.items()}
        value = float(tail_penalty(result.factors, gamma))  # the new rank's tail, rescaled B
    state[STATE] = ConfigRecord({"rank": result.rank, "tail": value, "tail-rank": result.rank})
    return result.factors, dict(start), result.rank, {TAIL: result.value}


@register
class HetLoRAPrune(Feature):
    """HetLoRA's rank self-pruning as client hooks; the server checks the tail a reply reports
    and adds it to the client's row."""

    name = "hetlora_prune"
    reply_metrics: ClassVar[ReplyMetrics] = {TAIL: (float, 0.0)}  # a norm product, >= 0
    order = 30  # lowers whatever rank the plan has (the bandit's comes first: `assign`)

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """On with `aggregator.name: hetlora` (it prunes only with prune_lambda > 0)."""
        return cfg.aggregator.name == "hetlora"

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        check_recipe(cfg)

    @classmethod
    def adds_to_steps(cls, cfg: RunConfig) -> bool:
        """Its regulariser only when pruning is on (prune_lambda > 0)."""
        options = {k: v for k, v in cfg.aggregator.options.items() if k in OPTIONS}
        return parse_options(options).active

    def plan(self, plan: ClientPlan, rnd: ClientRound) -> ClientPlan:
        """The rank this node last pruned to (taken back from its own folder after a resume), under
        the options the server sent this round."""
        self.opts = options_of(rnd.config)  # off unless the server sent prune_lambda > 0
        if self.opts.active:  # a resumed node (empty state) takes back the rank it pruned to
            restore_node_state(rnd, STATE, uncovered=raw_update(self.cfg))
        return planned(plan, rnd.state)

    def regularizers(self, model: torch.nn.Module, rnd: ClientRound) -> list[Regularizer]:
        term = regularizer(model, self.opts, rank=rnd.plan.rank)
        return [] if term is None else [term]

    def post_process(self, update: ClientUpdate, rnd: ClientRound) -> ClientUpdate:
        """With pruning on: the update (and its start) cut to a lower rank if its tail shrank since
        last round, the rank and tail kept in the node's state and own folder."""
        factors, start, rank, self.tail = prune_reply(
            update.factors,
            update.start,
            opts=self.opts,
            state=rnd.state,
            rank=update.rank,
            scaling=self.cfg.client_scaling,
        )
        if self.opts.active:
            save_node_state(rnd, STATE, uncovered=raw_update(self.cfg))
        return ClientUpdate(factors, start, rank)

    def metrics(self) -> dict[str, int | float]:
        return dict(getattr(self, "tail", {}))
