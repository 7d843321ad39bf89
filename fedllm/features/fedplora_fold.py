"""Fed-PLoRA's Select-N-Fold on both sides of a round (the math is `fedllm.aggregators.fedplora`).

Server: every node is sent the whole global adapter (R modules; no cut to its rank), and each
reply's modules go back at the indices of its seeded draw (its partition, rank and round; the
reply's `fedplora-draw` checksum must match it) before the aggregator runs (`release`: the
trainers' mean fills the rest, so each module is averaged over the clients that trained it).
Client: in every target module it selects rᵢ of the R one-rank modules (drawn per target, seeded
by the run's seed, the round, its partition and the target; `module_draw: client`: one draw for
all targets), folds the others into its frozen base for the round (the `fold` hook; restored
afterwards), trains the selected ones as its rank-rᵢ LoRA at the rank-R LoRA's scaling α/R
(`aggregator.options.module_scaling: global`; `client`: its own α/rᵢ) and reports the
checksum of its draws.

Refused: DP (a client-level release would mix the clients before their modules are placed),
SecAgg+ (the server must see each client's indices), top-k compression (its residual would follow
positions whose modules change every round), pruned or quantized bases (the fold needs the full
float weights), the bandit, and `aggregator.global_rank` (R is the largest client rank).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import RecordDict

from fedllm.aggregators.base import Factors
from fedllm.aggregators.fedplora import (
    CLIENT_DEFAULTS,
    check_module_draw,
    check_module_scaling,
    draw,
    draw_digest,
    expand,
    module_alpha,
    split,
    trainers_mean,
)
from fedllm.client.round import client_seed
from fedllm.features.base import Feature
from fedllm.features.personal import PersonalAdapter
from fedllm.features.registry import register
from fedllm.features.types import ClientPlan, ClientRound, Download, TrainReply, extra_number
from fedllm.recipe.schema import RunConfig

METRIC = "fedplora-draw"  # the reply metric: the checksum of the client's draws (`draw_digest`)


def module_scaling(cfg: RunConfig) -> str:
    """The recipe's `aggregator.options.module_scaling` ("global" by default), checked."""
    default = CLIENT_DEFAULTS["module_scaling"]
    return check_module_scaling(cfg.aggregator.options.get("module_scaling", default))


def per_target(cfg: RunConfig) -> bool:
    """True unless the recipe's `aggregator.options.module_draw` is "client" (one draw for every
    target module, the form of stops 50–52)."""
    default = CLIENT_DEFAULTS["module_draw"]
    return check_module_draw(cfg.aggregator.options.get("module_draw", default)) == "target"


def draws(cfg: RunConfig, targets: Sequence[str], *, rank: int, seed: int) -> dict[str, list[int]]:
    """A client's selected modules per target this round, as the recipe draws them."""
    return draw(targets, global_rank=cfg.max_rank, rank=rank, seed=seed, per_target=per_target(cfg))


def check_recipe(cfg: RunConfig) -> None:
    """Refuse what Select-N-Fold cannot run with, naming the recipe key."""
    module_scaling(cfg)
    per_target(cfg)
    problems = {
        "privacy.mode": cfg.privacy.mode != "none",
        "privacy.secure_aggregation.enabled": cfg.privacy.secure_aggregation.enabled,
        "compression.topk": cfg.compression.topk is not None,
        "model.quantization": cfg.model.quantization != "none",
        "lora.tiers (pruning or quantization)": any(
            t.pruning > 0 or t.quantization not in (None, "none") for t in cfg.lora.tiers or []
        ),
        "adaptive": cfg.adaptive is not None,
        "aggregator.global_rank": cfg.aggregator.global_rank is not None,
        # a client's trained modules are r of R: its whole model is the folded rest too (h98)
        "features.personal_adapter": PersonalAdapter.enabled(cfg),
    }
    bad = [key for key, hit in problems.items() if hit]
    if bad:
        raise ValueError(
            f"{bad[0]}: not supported with aggregator.name='fedplora' (Select-N-Fold folds the "
            "untrained global modules into a full-precision base and places each client's "
            "modules by their indices, at R = the largest client rank); leave it at its default"
        )


@register
class FedPLoRAFold(Feature):
    """Select rᵢ of the R global modules, fold the rest into the base, report the indices."""

    name = "fedplora_fold"
    own_adapter_shape = True
    order = 10  # the server's placement comes before any other release

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """On with `aggregator.name: fedplora`."""
        return cfg.aggregator.name == "fedplora"

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cls.enabled(cfg):
            check_recipe(cfg)

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.selected: dict[str, list[int]] = {}  # client: target -> the indices it trains
        self.placed: dict[int, dict[str, list[int]]] = {}  # server: node -> its reply's draws
        self.round = 0  # server: the round whose replies `receive` checks

    # -- client --------------------------------------------------------------------------------
    def plan(self, plan: ClientPlan, rnd: ClientRound) -> ClientPlan:
        """Train the selected modules at the rank-R LoRA's scaling (`module_scaling: global`)."""
        alpha = module_alpha(
            self.cfg.lora.alpha,
            rank=plan.rank,
            global_rank=self.cfg.max_rank,
            module_scaling=module_scaling(self.cfg),
        )
        return dataclasses.replace(plan, lora_alpha=alpha)

    def fold(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        """Draw this round's modules in every target and return the others, to fold."""
        ranks = {f.rank for f in factors.values()}
        if ranks - {self.cfg.max_rank}:
            raise ValueError(
                f"the global adapter has ranks {sorted(ranks)}, not R = {self.cfg.max_rank}"
            )
        self.selected = draws(self.cfg, list(factors), rank=rnd.plan.rank, seed=rnd.seed)
        folded: dict[str, Factors] = {}
        for target, f in factors.items():
            _, rest = split(f, self.selected[target])
            if rest is not None:
                folded[target] = rest
        return folded

    def start(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        """The selected modules, in index order, as the adapter this client trains."""
        return {m: split(f, self.selected[m])[0] for m, f in factors.items()}

    def metrics(self) -> dict[str, Any]:
        """The checksum of this round's draws (`fedplora-draw`)."""
        return {METRIC: draw_digest(self.selected)} if self.selected else {}

    # -- server --------------------------------------------------------------------------------
    def before_round(
        self, server_round: int, *, partitions: Sequence[int], sampled: int
    ) -> str | None:
        """Note the round: its replies' modules are placed at its seeded draws."""
        self.round = server_round
        return None

    def download(self, node: int, down: Download) -> Download:
        """The whole global adapter: a client selects its modules and folds the rest."""
        return dataclasses.replace(down, rank=None)

    def receive(
        self,
        node: int,
        content: RecordDict,
        *,
        factors: dict[str, Factors],
        reply: TrainReply,
        shapes: Mapping[str, tuple[int, int]],
    ) -> dict[str, Factors]:
        """Keep the reply's draws for `release`: the server makes them itself (partition, rank,
        round), and the reply's checksum must match, so a client trained where its modules go
        (under the trainers' mean a client that picked a module nobody else trains would set it
        alone; one with another draw would land its modules at the wrong indices)."""
        sent = extra_number(reply, METRIC, kind=int, minimum=0)
        if sent is None:
            raise ValueError(f"a fedplora reply must carry its draws' checksum in {METRIC!r}")
        seed = client_seed(self.cfg, server_round=self.round, partition=reply.partition)
        drawn = draws(self.cfg, list(factors), rank=reply.rank, seed=seed)
        if sent != (want := draw_digest(drawn)):
            raise ValueError(
                f"{METRIC} {sent} is not the checksum of partition {reply.partition}'s seeded "
                f"draws at rank {reply.rank} in round {self.round} ({want}): a client does not "
                "choose its modules"
            )
        self.placed[node] = drawn
        return factors

    def release(
        self,
        nodes: Sequence[int],
        inputs: list[dict[str, Factors]],
        *,
        weights: list[float],
        global_: Mapping[str, Factors],
    ) -> tuple[list[dict[str, Factors]], list[float]]:
        """Every update as R modules: its own at its indices, and elsewhere the mean of the
        clients that trained that module (the global one where none did): the aggregator's
        mean over every client is then each module's mean over its trainers, the paper's."""
        if not inputs:
            return inputs, weights
        selected = [self.placed[node] for node in nodes]
        expanded = [
            {m: expand(f, chosen[m], global_=global_[m]) for m, f in update.items()}
            for chosen, update in zip(selected, inputs, strict=True)
        ]
        by_module = {
            m: trainers_mean([u[m] for u in expanded], [c[m] for c in selected], weights)
            for m in expanded[0]
        }
        self.placed = {}
        return [{m: by_module[m][i] for m in update} for i, update in enumerate(expanded)], weights
