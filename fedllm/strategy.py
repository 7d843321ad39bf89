"""A thin Flower strategy for heterogeneous-rank LoRA: unpack replies, screen, aggregate by name.

All the mathematics lives in `fedllm.aggregators`; this class only turns Flower messages into
per-module factors and back, sends each node the global factors cut to its own rank, and keeps the
global adapter between rounds.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedllm import rounds
from fedllm.aggregators import Factors, get, round_spec
from fedllm.aggregators.screen import screen
from fedllm.config import RunConfig
from fedllm.constrained_server import ConstrainedClients
from fedllm.privacy.server import make_client_dp

log = logging.getLogger("fedllm.server")


def initial_factors(
    shapes: Mapping[str, tuple[int, int]], *, rank: int, scaling: float, seed: int
) -> dict[str, Factors]:
    """The starting adapter: B = 0 (so round 0 is the base model), A as peft initialises it."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Factors] = {}
    for module, (d, k) in sorted(shapes.items()):
        bound = 1.0 / math.sqrt(k)  # kaiming_uniform_(a=√5) on a (rank × k) weight
        a = (torch.rand(rank, k, generator=gen) * 2 - 1) * bound
        out[module] = Factors(torch.zeros(d, rank), a, scaling)
    return out


def client_row(server_round: int, node: int, m: Mapping[str, Any]) -> dict:
    """One accepted client's line in metrics.jsonl, from its reply's metrics."""
    return {
        "round": server_round,
        "node": node,
        "status": "ok",
        "partition": int(m["partition-id"]),
        "rank": int(m["rank"]),
        "num_examples": int(m["num-examples"]),
        "train_loss": float(m["train-loss"]),
        "train_loss_first": float(m["train-loss-first"]),
        "train_loss_last": float(m["train-loss-last"]),
        "steps": int(m["steps"]),
        "train_seconds": float(m["train-seconds"]),
        "bytes_sent": int(m["bytes-sent"]),
        "bytes_received": int(m["bytes-received"]),
        "pruning": float(m.get("pruning", 0.0)),
        **({"hetlora_tail": float(m["hetlora-tail"])} if "hetlora-tail" in m else {}),
    }


class LoraStrategy(Strategy):
    """Heterogeneous-rank LoRA federated training with a pluggable aggregator."""

    def __init__(self, cfg: RunConfig, *, shapes: Mapping[str, tuple[int, int]]) -> None:
        self.cfg = cfg
        self.shapes = dict(shapes)
        self.aggregate_fn = get(cfg.aggregator.name)
        self.spec = round_spec(cfg.aggregator.name)  # what travels each round (fedllm.rounds)
        # privacy.mode=client: clip + average + noise, then the aggregator post-processes
        self.client_dp = make_client_dp(cfg, self.aggregate_fn, freeze_a=self.spec.freeze_A)
        # pruned / quantized / compressed clients and the (rank, pruning) bandit
        self.constrained = ConstrainedClients(cfg)
        ranks = [cfg.client_rank(i) for i in range(cfg.data.num_clients)]
        max_rank = max([*ranks, self.constrained.max_rank()])
        self.max_rank = max_rank
        self.global_: dict[str, Factors] = initial_factors(
            shapes, rank=max_rank, scaling=cfg.client_scaling(max_rank), seed=cfg.seed
        )
        self.agg_state: dict[str, dict[str, torch.Tensor]] = {}
        self.node_ranks: dict[int, int] = {}
        self.node_partitions: dict[int, int] = {}
        self.round_rows: list[dict] = []
        # partition -> (round, factors) of its latest accepted update: the server's view of it
        self.client_updates: dict[int, tuple[int, dict[str, Factors]]] = {}

    # -- state for checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "global": {m: (f.B, f.A, f.scaling) for m, f in self.global_.items()},
            "agg_state": self.agg_state,
            "node_ranks": dict(self.node_ranks),
            "node_partitions": dict(self.node_partitions),
            "constrained": self.constrained.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_ = {m: Factors(b, a, s) for m, (b, a, s) in state["global"].items()}
        self.agg_state = state["agg_state"]
        self.node_ranks = dict(state["node_ranks"])
        self.node_partitions = dict(state["node_partitions"])
        if "constrained" in state:
            self.constrained.load_state_dict(state["constrained"])

    @property
    def global_scaling(self) -> float:
        return next(iter(self.global_.values())).scaling

    def global_record(self) -> ArrayRecord:
        return rounds.outgoing(self.global_, self.spec)

    def _config(self, server_round: int) -> ConfigRecord:
        return ConfigRecord(
            {
                "server-round": server_round,
                "global-scaling": self.global_scaling,
                "recipe-hash": self.cfg.fingerprint(),
                **rounds.spec_config(self.spec),
                **rounds.options_config(self.spec, self.cfg.aggregator.options),
            }
        )

    def _sample(self, server_round: int, grid: Grid) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        wanted = self.cfg.federation.clients_per_round or len(nodes)
        rng = random.Random(self.cfg.seed * 7919 + server_round)
        return sorted(rng.sample(nodes, min(wanted, len(nodes))))

    # -- Flower Strategy interface ---------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each sampled node gets the global factors cut to its rank (full rank until known).

        A merged delta (flora) always travels whole; under fedsa only A travels.
        """
        messages = []
        for node in self._sample(server_round, grid):
            rank = self.node_ranks.get(node)
            extra: dict = {}
            if self.constrained.active:  # cut to kept ids and rank, wire dtype, bandit's arm
                record, extra = self.constrained.download(node, self.global_, rank=rank)
            elif rank is None or self.spec.merge:
                record = arrays
            else:
                cut = {m: f.truncate(rank, f.scaling) for m, f in self.global_.items()}
                record = rounds.outgoing(cut, self.spec)
            config = ConfigRecord({**self._config(server_round), **extra})
            content = RecordDict({"global": record, "config": config})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, aggregate module by module, keep the new global adapter."""
        updates: dict[str, dict[str, Factors]] = {}
        metrics: dict[str, MetricRecord] = {}
        rows: list[dict] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("round %d: node %s failed: %s", server_round, node, msg.error.reason)
                rows.append(
                    {
                        "round": server_round,
                        "node": node,
                        "status": "failed",
                        "reason": msg.error.reason,
                    }
                )
                continue
            m = msg.content["metrics"]
            try:
                rank = int(m["rank"])
                if rank <= 0:
                    raise ValueError(f"claims rank {rank}")
                scaling = self.cfg.client_scaling(rank)  # α/r from the recipe, not trusted
                if self.constrained.active:  # full shape from a pruned / compressed reply
                    pruning = float(m.get("pruning", 0.0))
                    update = self.constrained.receive(
                        node, msg.content, rank=rank, pruning=pruning, shapes=self.shapes
                    )
                else:
                    update = rounds.read_update(
                        msg.content["update"], scaling, self.spec, self.shapes
                    )
                if any(f.rank != rank for f in update.values()):
                    raise ValueError(f"claims rank {rank} but sent factors of other ranks")
                updates[str(node)] = update
            except (KeyError, ValueError, TypeError) as err:
                log.warning("round %d: node %s sent a malformed reply: %s", server_round, node, err)
                rows.append(
                    {
                        "round": server_round,
                        "node": node,
                        "status": "rejected",
                        "reason": f"malformed reply: {err}",
                    }
                )
                continue
            metrics[str(node)] = m
            self.node_ranks[node] = int(m["rank"])
            self.node_partitions[node] = int(m["partition-id"])
        accepted, rejected = screen(
            updates,
            shapes=self.shapes,
            max_rank=self.max_rank,
            max_norm_ratio=self.cfg.federation.max_rejected_norm_ratio,
        )
        for node, reason in rejected.items():
            log.warning("round %d: rejected node %s: %s", server_round, node, reason)
            rows.append(
                {
                    "round": server_round,
                    "node": int(node),
                    "status": "rejected",
                    "partition": self.node_partitions.get(int(node)),
                    "reason": reason,
                }
            )
        for node in accepted:
            m = metrics[node]
            self.constrained.observe(int(node), m)  # the bandit learns from this round
            rows.append(client_row(server_round, int(node), m))
        self.round_rows = rows
        if not accepted:
            log.warning(
                "round %d: no acceptable update; the global adapter is unchanged", server_round
            )
            return None, None
        if self.cfg.aggregator.weighting == "uniform":
            weights = [1.0] * len(accepted)
        else:
            weights = [float(metrics[n]["num-examples"]) for n in accepted]
        new_global: dict[str, Factors] = {}
        new_state: dict[str, dict[str, torch.Tensor]] = {}
        inputs, input_weights = [updates[n] for n in accepted], weights
        if self.constrained.active and self.client_dp is None:
            # pruned clients: per-coordinate weights by who covers it (fedllm.prune_map)
            full = self.constrained.aggregation_inputs(accepted, weights, self.shapes)
            inputs = [full[n] for n in accepted]
        if self.client_dp is not None:  # DP-FedAvg release (fedllm.privacy.client_dp)
            inputs, input_weights = [self.client_dp.release(self.global_, inputs)], [1.0]
        for module in sorted(self.shapes):
            result = self.aggregate_fn(
                [u[module] for u in inputs],
                input_weights,
                global_rank=self.cfg.aggregator.global_rank,
                state=self.agg_state.get(module),
                seed=self.cfg.seed + server_round,
                **rounds.server_options(self.spec, self.cfg.aggregator.options),
            )
            new_global[module] = result.global_
            new_state[module] = result.state
        self.global_, self.agg_state = new_global, new_state
        for n in accepted:
            self.client_updates[int(metrics[n]["partition-id"])] = (server_round, updates[n])
        total = sum(weights)
        summary = MetricRecord(
            {
                "clients": len(accepted),
                "rejected": sum(1 for r in rows if r["status"] != "ok"),
                "train-loss": sum(
                    w * float(metrics[n]["train-loss"])
                    for w, n in zip(weights, accepted, strict=True)
                )
                / total,
                "global-rank": max(f.rank for f in self.global_.values()),
            }
        )
        return self.global_record(), summary

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every node evaluates the global adapter on its own held-out split."""
        content = RecordDict({"global": arrays, "config": self._config(server_round)})
        return [
            Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in sorted(grid.get_node_ids())
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Token-weighted global held-out loss; per-client losses are kept in `round_rows`."""
        nll, tokens, rows = 0.0, 0, []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning(
                    "round %d: node %s failed to evaluate: %s", server_round, node, msg.error.reason
                )
                continue
            m = msg.content["metrics"]
            nll += float(m["nll-sum"])
            tokens += int(m["tokens"])
            rows.append(
                {
                    "round": server_round,
                    "partition": int(m["partition-id"]),
                    "held_out_loss": float(m["held-out-loss"]),
                    "tokens": int(m["tokens"]),
                }
            )
        self.round_rows = rows
        if tokens == 0:
            return None
        return MetricRecord({"held-out-loss": nll / tokens, "tokens": tokens})

    def summary(self) -> None:
        log.info(
            "LoraStrategy: aggregator=%s, ranks up to %d, %d modules",
            self.cfg.aggregator.name,
            self.max_rank,
            len(self.shapes),
        )
