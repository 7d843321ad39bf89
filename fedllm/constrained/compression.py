"""Cheaper training messages (`compression:`): factors in fp16/bf16, optionally top-k deltas with
error feedback (the codec is `fedllm.constrained.compress`).

The server remembers what it sent each node this round, so it can rebuild a top-k reply from
the start the client had. A top-k client also writes its residual into its own folder
(`features.node_state.save_node_state`: `clients/<p>/node_state/`, or the node's `personal-dir`),
never sent, and a node whose state has none (a resumed simulation's new process) takes it back
before it encodes; where the update is raw (`features.personal.raw_update`: client-level DP
noised by the server) only a node's own `personal-dir` keeps it, never the run directory.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord, RecordDict

from fedllm.aggregators.base import Factors
from fedllm.constrained.compress import (
    RESIDUAL_KEY,
    decode_factors,
    decode_update,
    encode_factors,
    encode_update,
)
from fedllm.constrained.prune_map import fit_start, kept_from_record
from fedllm.features.base import Feature, require_adapter_state
from fedllm.features.node_state import restore_node_state, save_node_state
from fedllm.features.personal import raw_update
from fedllm.features.registry import register
from fedllm.features.types import ClientRound, ClientUpdate
from fedllm.recipe.schema import RunConfig


@register
class Compression(Feature):
    """The training messages in the recipe's wire dtype, the reply optionally top-k sparsified."""

    name = "compression"
    order = 90  # encodes last, after every feature changed the update

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """On when `compression` asks for a wire dtype other than float32, or for top-k."""
        c = cfg.compression
        return c.dtype != "float32" or c.topk is not None

    def sent_start(self) -> bool:
        return self.cfg.compression.topk is not None  # a delta the server adds to what it sent

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cls.enabled(cfg):
            require_adapter_state(cfg, "compression.dtype/topk")

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.sent: dict[int, dict[str, Factors]] = {}  # server: this round's download, decoded

    # -- client --------------------------------------------------------------------------------
    def read_global(self, record: ArrayRecord, rnd: ClientRound) -> dict[str, Factors] | None:
        scaling = float(rnd.config["global-scaling"])
        return decode_factors(record, scaling=scaling, dtype=self.cfg.compression.dtype)

    def reply(
        self, arrays: dict[str, ArrayRecord], update: ClientUpdate, *, rnd: ClientRound
    ) -> dict[str, ArrayRecord]:
        """The update re-encoded in the wire dtype (top-k: with error feedback, its residual kept in
        the node's state and own folder, never sent)."""
        c = self.cfg.compression
        raw = raw_update(self.cfg)  # the residual is then part of a raw update
        if c.topk is not None:  # a resumed node (empty state) takes back the residual it wrote
            restore_node_state(rnd, RESIDUAL_KEY, uncovered=raw)
        encoded = encode_update(
            update.factors, update.start, dtype=c.dtype, topk=c.topk, state=rnd.state
        )
        if c.topk is not None:
            save_node_state(rnd, RESIDUAL_KEY, uncovered=raw)
        return {**arrays, "update": encoded}

    # -- server --------------------------------------------------------------------------------
    def encode(self, node: int, factors: Mapping[str, Factors]) -> ArrayRecord | None:
        """The factors in the wire dtype, remembered as `node` will decode them (`decode` rebuilds a
        top-k reply on them)."""
        dtype = self.cfg.compression.dtype
        record = encode_factors(factors, dtype=dtype)
        scaling = next(iter(factors.values())).scaling
        self.sent[node] = decode_factors(record, scaling=scaling, dtype=dtype)
        return record

    def decode(self, node: int, content: RecordDict, *, rank: int) -> dict[str, Factors] | None:
        """A reply's factors from the wire dtype; a top-k one is rebuilt on what `node` was sent
        this round (cut to its kept ids and rank), a ValueError if it was sent nothing."""
        c, who = self.cfg.compression, f"client (node {node})"
        scaling = self.cfg.client_scaling(rank)
        start: dict[str, Factors] = {}
        if c.topk is not None:
            if node not in self.sent:
                raise ValueError(f"{who}: sent a top-k update but was sent no factors this round")
            kept = kept_from_record(content.get("kept"), who=who)
            start = fit_start(self.sent[node], kept, rank=rank, scaling=scaling)
        factors = decode_update(
            content["update"], start, scaling=scaling, dtype=c.dtype, topk=c.topk
        )
        return factors
