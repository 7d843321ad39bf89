"""Pruned bases: a client whose plan has a pruning ratio trains on a smaller copy of the base.

Client: prunes the base once per app cache (Wanda or magnitude over its own batches, see
`fedllm.constrained.pruning`), starts from the global factors cut to the ids it kept, and sends
its kept-index map with its update. Server: sends a node only its kept ids once it knows them,
expands replies to full shape (zeros at pruned ids) and weights each coordinate by the clients
that cover it (`fedllm.constrained.prune_map`).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from transformers import AutoConfig

from fedllm.aggregators import round_spec
from fedllm.aggregators.base import Factors
from fedllm.constrained.prune_map import (
    Kept,
    check_kept,
    coverage_weighted,
    expand,
    kept_from_record,
    kept_to_record,
    restrict,
    uncovered_fill,
)
from fedllm.constrained.pruning import (
    check_sides,
    prune_model,
    prune_plan,
    pruned_module_shapes,
)
from fedllm.constrained.tiers import tier_of
from fedllm.data import collate
from fedllm.features.base import Feature, require_adapter_state
from fedllm.features.registry import register
from fedllm.features.types import ClientRound, ClientUpdate, Download, TrainReply
from fedllm.model.base import prepare_base_model
from fedllm.model.loading import load_base_model
from fedllm.recipe.schema import RunConfig

log = logging.getLogger("fedllm.server")


def pruned_base(rnd: ClientRound, base: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Kept]]:
    """(pruned model, kept map of the adapted modules), kept in the app's cache (`rnd.cache`)
    for the client's next round at the same plan."""
    cfg, plan, tokenizer = rnd.cfg, rnd.plan, rnd.tokenizer

    def build():
        size = cfg.federation.batch_size
        examples = rnd.shard.train[: cfg.pruning.calibration_batches * size]
        batches = [
            collate(examples[i : i + size], pad_id=tokenizer.pad_token_id)
            for i in range(0, len(examples), size)
        ]
        model, kept = prune_model(
            base,
            plan.pruning,
            method=cfg.pruning.importance,
            batches=batches,
            parts=tuple(cfg.pruning.parts),
        )
        if plan.quantization is not None:
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                model, _ = load_base_model(
                    tmp,
                    dtype=cfg.model.dtype,
                    quantization=plan.quantization,
                    attention=cfg.model.attention,
                    max_length=cfg.data.max_length,
                )
        targets = tuple(cfg.lora.target_modules)
        adapted = {m: k for m, k in kept.items() if m.rsplit(".", 1)[-1] in targets}
        return model, adapted

    key = (
        cfg.model.name,
        cfg.model.dtype,
        cfg.fingerprint(),
        cfg.pruning.model_dump_json(),
        plan.partition,
        plan.pruning,
        plan.quantization,
    )
    return rnd.cache.pruned.get(key, build) if rnd.cache is not None else build()


def restricted(factors: Mapping[str, Factors], kept: Mapping[str, Kept]) -> dict[str, Factors]:
    """Full-shape factors cut to the kept ids; factors already cut pass through."""
    out = {}
    for module, f in factors.items():
        k = kept.get(module)
        cut_rows = k is not None and k.out is not None and f.B.shape[0] != len(k.out)
        cut_cols = k is not None and k.in_ is not None and f.A.shape[1] != len(k.in_)
        out[module] = restrict(f, k) if cut_rows or cut_cols else f
    return out


def planned_ranks(cfg: RunConfig) -> list[tuple[str, int, float]]:
    """(who, rank, pruning ratio) of every client and every bandit arm of the recipe."""
    plans = []
    for p in range(cfg.data.num_clients):
        tier = tier_of(cfg, p)
        plans.append((f"client {p}", cfg.client_rank(p), tier.pruning if tier else 0.0))
    if cfg.adaptive is not None:
        plans += [
            (f"adaptive arm (rank {r}, pruning {q})", r, q)
            for r in cfg.adaptive.ranks
            for q in cfg.adaptive.pruning
        ]
    return plans


@register
class PrunedBase(Feature):
    """Clients train on a pruned base; the server speaks to them in their kept ids."""

    name = "pruned_base"
    order = 40  # after tiers have set the plan's pruning ratio (the bandit's: `assign`)

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """On when a tier (`lora.tiers`) or a bandit arm (`adaptive.pruning`) prunes (ratio > 0)."""
        # a pruned tier or bandit arm (not per client: this runs on every message)
        arms = cfg.adaptive.pruning if cfg.adaptive is not None else []
        return any(t.pruning > 0 for t in cfg.lora.tiers or []) or any(q > 0 for q in arms)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if not cls.enabled(cfg):
            return
        used = [t.name for t in cfg.lora.tiers or [] if t.pruning > 0]
        require_adapter_state(
            cfg, f"pruning (tiers {used})" if used else "adaptive (rank, pruning)"
        )
        if round_spec(cfg.aggregator.name).freeze_A:
            raise ValueError(
                f"aggregator {cfg.aggregator.name!r} (frozen shared A) with pruned clients is not "
                "supported: the coverage rescaling rebuilds each update from the client's own A, "
                "not the server's frozen one, and a column-pruned module's rescaled A is no "
                "slice of it (every round was refused, h97); use svd, squeeze or fedit, or drop "
                "the pruning"
            )
        if cfg.privacy.mode == "client":  # first: no other change makes this recipe run
            raise ValueError(
                "privacy.mode='client' with pruned clients is not supported: pruned rows would "
                "enter the clipped delta as zeros and pull the global towards zero there; drop "
                "the pruning or use privacy.mode 'sample'"
            )
        if cfg.privacy.mode != "none" and cfg.pruning.importance == "wanda":
            raise ValueError(
                "pruning.importance='wanda' computes the kept-index map a client sends from its "
                "private batches, outside the DP guarantee; use pruning.importance: magnitude"
            )

    @classmethod
    def prepare(cls, cfg: RunConfig, *, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Every tier's (and bandit arm's) rank must fit its pruned modules."""
        config = AutoConfig.from_pretrained(prepare_base_model(cfg))
        for who, rank, ratio in planned_ranks(cfg):
            if ratio == 0:
                continue
            plan = prune_plan(config, ratio, parts=tuple(cfg.pruning.parts))
            for name, (d, k) in pruned_module_shapes(shapes, config, plan=plan).items():
                if rank > min(d, k):
                    raise ValueError(
                        f"{who}: rank {rank} does not fit module {name} pruned to {(d, k)} at "
                        f"pruning {ratio} (valid ranks: 1..{min(d, k)})"
                    )

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.kept: dict[str, Kept] = {}  # client: this round's map
        self.known: dict[int, tuple[float, dict[str, Kept]]] = {}  # server: node -> (ratio, map)
        self.received: dict[int, tuple[dict[str, Factors], dict[str, Kept]]] = {}

    # -- client --------------------------------------------------------------------------------
    def prepare_base(self, base: torch.nn.Module, rnd: ClientRound) -> torch.nn.Module:
        if rnd.plan.pruning == 0:
            return base
        pruned, self.kept = pruned_base(rnd, base)
        return pruned

    def start(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        return restricted(factors, self.kept)

    def reply(
        self, arrays: dict[str, ArrayRecord], update: ClientUpdate, *, rnd: ClientRound
    ) -> dict[str, ArrayRecord]:
        return {**arrays, "kept": kept_to_record(self.kept)} if self.kept else arrays

    # -- server --------------------------------------------------------------------------------
    def download(self, node: int, down: Download) -> Download:
        """The global factors cut to the ids `node` keeps (known from its last reply at the
        pruning ratio it runs this round)."""
        known = self.known.get(node)
        ratio = down.config.get("pruning")
        if known is None or (ratio is not None and known[0] != ratio) or down.rank is None:
            return down
        return dataclasses.replace(down, factors=restricted(down.factors, known[1]))

    def receive(
        self,
        node: int,
        content: RecordDict,
        *,
        factors: dict[str, Factors],
        reply: TrainReply,
        shapes: Mapping[str, tuple[int, int]],
    ) -> dict[str, Factors]:
        """A reply's factors at full shape (zeros at pruned ids); ValueError if its map is bad."""
        who = f"client (node {node})"
        kept = kept_from_record(content.get("kept"), who=who)
        check_kept(factors, kept, shapes=shapes, who=who)
        check_sides(kept, who=who)
        self.received[node] = (factors, kept)
        self.known[node] = (reply.pruning, kept)
        return {
            m: expand(f, kept.get(m), shape=shapes[m]) if m in shapes else f
            for m, f in factors.items()
        }

    def release(
        self,
        nodes: Sequence[int],
        inputs: list[dict[str, Factors]],
        *,
        weights: list[float],
        global_: Mapping[str, Factors],
    ) -> tuple[list[dict[str, Factors]], list[float]]:
        """Full-shape inputs rescaled per coordinate by the weight of the clients covering it."""
        got = [self.received[n] for n in nodes]
        self.received = {}
        shapes = {m: f.shape for m, f in global_.items()}
        updates, kept = [g[0] for g in got], [g[1] for g in got]
        if (fill := uncovered_fill(updates, kept, weights=weights, global_=global_)) is not None:
            # coordinates every reply pruned keep the global's value (they came out 0)
            updates, kept, weights = [*updates, fill[0]], [*kept, fill[1]], [*weights, fill[2]]
            log.info("coordinates no reply covered keep the global's value this round")
        return coverage_weighted(updates, kept, weights=weights, shapes=shapes), weights

    def state_dict(self) -> dict[str, Any]:
        return {
            "kept": {
                n: (r, {m: (k.out, k.in_) for m, k in km.items()})
                for n, (r, km) in self.known.items()
            }
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is None:
            return
        self.known = {
            n: (r, {m: Kept(o, i) for m, (o, i) in km.items()})
            for n, (r, km) in state["kept"].items()
        }
