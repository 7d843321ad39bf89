"""A thin Flower strategy for heterogeneous-rank LoRA: unpack replies, screen, aggregate by name.

All the mathematics lives in `fedllm.aggregators`; this class turns Flower messages into
per-module factors and back, sends each node the global factors cut to its own rank, and keeps the
global adapter between rounds. Optional capabilities change what travels and what is aggregated
through their server hooks (`fedllm.features`), called in order; none is known here by name.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedllm.aggregators.base import Factors
from fedllm.aggregators.registry import get, round_spec
from fedllm.aggregators.screen import screen
from fedllm.errors import short_reason
from fedllm.features.base import Feature
from fedllm.features.node_state import ATTEMPTS, encode_attempts
from fedllm.features.types import (
    ClientRow,
    Download,
    EvalRow,
    RoundResult,
    TrainReply,
    declared_metrics,
)
from fedllm.model import wire
from fedllm.model.adapters import initial_factors
from fedllm.recipe.schema import RunConfig
from fedllm.server import seats
from fedllm.server.aggregation import aggregate_modules, post_process
from fedllm.server.evaluation import evaluate_round, evaluation_panel
from fedllm.server.replies import malformed_row, read_reply, refuse_shared_partitions

log = logging.getLogger("fedllm.server")


class LoraStrategy(Strategy):
    """Heterogeneous-rank LoRA federated training with a pluggable aggregator and features."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        shapes: Mapping[str, tuple[int, int]],
        features: Sequence[Feature] = (),
    ) -> None:
        self.cfg = cfg
        self.shapes = dict(shapes)
        self.features = list(features)
        # what the features add to an evaluation reply (key -> type), read with every reply
        self.eval_metrics = {k: v for f in self.features for k, v in f.eval_metrics.items()}
        self.aggregate_fn = get(cfg.aggregator.name)
        self.spec = round_spec(cfg.aggregator.name)  # what travels each round (fedllm.model.wire)
        self.max_rank = cfg.max_rank
        self.global_: dict[str, Factors] = initial_factors(
            shapes, rank=self.max_rank, scaling=cfg.client_scaling(self.max_rank), seed=cfg.seed
        )
        self.agg_state: dict[str, dict[str, torch.Tensor]] = {}
        if self.spec.freeze_A:  # FFA's shared frozen A₀ is the server's from the start (h105)
            self.agg_state = {m: {"A": f.A} for m, f in self.global_.items()}
        self.node_ranks: dict[int, int] = {}
        self.node_partitions: dict[int, int] = {}
        self.seen: set[int] = set()  # nodes that replied to this process (not to a resumed one)
        # partition -> (round, factors) of its latest accepted update: the server's view of it
        self.client_updates: dict[int, tuple[int, dict[str, Factors]]] = {}
        # (token, first round) of each process that ran this run, the current one last: a node
        # tells a state file of a round lost to a crash from a finished one (`node_state`)
        self.attempts: list[tuple[str, int]] = []
        # node -> the partition it says it holds (`seats`): asked once per process, not saved
        self.claims: dict[int, int] = {}
        self.introduced = False
        # node -> partition of the ids per-node state is kept under (`seats.carried`): a resumed
        # run's until introduced, then this process's; saved, so state follows new ids again
        self.node_seats: dict[int, int] = {}
        self.sampled: tuple[int, list[int]] | None = None  # (round, its sample), drawn once

    @property
    def max_norm_ratio(self) -> float:
        """The recipe's outlier ratio, or none (∞) when the recipe turns it off (null) or a
        feature forbids comparing clients."""
        ratio = self.cfg.federation.max_rejected_norm_ratio
        relative = all(f.screen_relative for f in self.features)
        return ratio if relative and ratio is not None else math.inf

    @property
    def max_reply_bytes(self) -> int:
        """The largest reply arrays a client may send: float32 factors at the largest rank, plus
        int64 kept-index maps, twice over for slack (top-k indices, SecAgg+ padding)."""
        per_module = [(d + k) * (4 * self.max_rank + 8) for d, k in self.shapes.values()]
        return 2 * sum(per_module) + 65_536

    @property
    def private(self) -> bool:
        """Whether a feature limits what leaves clients: then no per-client result is saved."""
        return any(f.reply_keys() is not None for f in self.features)

    # -- state for checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint keeps: global adapter, aggregator state, what is known of nodes."""
        return {
            "global": {m: (f.B, f.A, f.scaling) for m, f in self.global_.items()},
            "agg_state": self.agg_state,
            "node_ranks": dict(self.node_ranks),
            "node_partitions": dict(self.node_partitions),
            "node_seats": dict(self.node_seats),
            # the server's view of each client (client_adapters/ at the end); empty when private
            "client_updates": {
                p: (rnd, {m: (f.B, f.A, f.scaling) for m, f in update.items()})
                for p, (rnd, update) in self.client_updates.items()
            },
            "attempts": [list(attempt) for attempt in self.attempts],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict`'s output (a checkpoint)."""
        self.global_ = {m: Factors(b, a, s) for m, (b, a, s) in state["global"].items()}
        self.agg_state = state["agg_state"]
        self.node_ranks = dict(state["node_ranks"])
        self.node_partitions = dict(state["node_partitions"])
        self.client_updates = {  # a private run keeps none (h107: not even an old checkpoint's)
            p: (rnd, {m: Factors(b, a, s) for m, (b, a, s) in update.items()})
            for p, (rnd, update) in state.get("client_updates", {}).items()
            if not self.private
        }
        self.attempts = [(str(t), int(r)) for t, r in state.get("attempts", [])]
        # a checkpoint before stop 48 knew the ids of accepted replies only (every one is seated)
        self.node_seats = dict(state.get("node_seats") or self.node_partitions)

    def begin(self, first_round: int) -> None:
        """This process runs the rounds from `first_round` on: a new attempt, with a new token."""
        self.attempts.append((secrets.token_hex(6), first_round))

    @property
    def global_scaling(self) -> float:
        """The global adapter's LoRA scaling: α/r at the largest client rank before the first
        aggregate, 1 after it (every built-in aggregator folds each client's sᵢ into its
        factors)."""
        return next(iter(self.global_.values())).scaling

    def global_record(self) -> ArrayRecord:
        """The global adapter as Flower arrays, in this aggregator's wire layout."""
        return wire.outgoing(self.global_, self.spec)

    def round_config(self, server_round: int) -> dict[str, Any]:
        """What every node is told this round: the round, the global scaling, the semantics."""
        return {
            "server-round": server_round,
            "global-scaling": self.global_scaling,
            "recipe-hash": self.cfg.fingerprint(),
            ATTEMPTS: encode_attempts(self.attempts),
            **wire.spec_config(self.spec),
            **wire.options_config(self.spec, self.cfg.aggregator.options),
        }

    def introduce(self, grid: Grid) -> None:
        """Once per server process, when nodes are connected: ask each which partition it holds
        (`seats`; within the round's deadline, the one wait a simulation's worker start-up
        needs). A node that joins later, or did not answer, is seated by its id. When none of a
        resumed checkpoint's node ids is connected (a simulation's new ids), what features kept
        per node, and the rank its downloads are cut to, move to the node claiming its
        partition; the partition a node trained as
        (`node_partitions`, which vouches for its replies) is only ever learned from training."""
        nodes = sorted(grid.get_node_ids())
        if self.introduced or not nodes:
            return
        self.introduced = True
        asked = [seats.query(n) for n in nodes]  # a list: a deployment's grid reads it twice
        replies = grid.send_and_receive(asked, timeout=self.cfg.federation.round_timeout)
        self.claims = seats.read_claims(replies, num_clients=self.cfg.data.num_clients)
        old = self.node_seats
        persist = not old or set(old) & set(nodes)  # ids that persist: nothing to move
        moved = {} if persist else seats.renumbering(old, self.claims)
        self.node_seats = seats.carried(old, claims=self.claims, moved=moved)
        if moved:
            for f in self.features:
                f.renumber(moved)
            # the rank each download is cut to (only bandwidth: the node cuts to its own rank
            # anyway); unmoved, the first round after a resume sent every node the whole global
            self.node_ranks = {moved.get(n, n): r for n, r in self.node_ranks.items()}
            log.info("node state moved to new ids by their partitions: %s", moved)

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """The nodes asked to train in `server_round`, drawn once per round: seeded by the round
        over the nodes' seats (their partitions; `seats`), so a resumed run asks the clients the
        run it resumes would have, whatever ids its nodes have now."""
        if self.sampled is not None and self.sampled[0] == server_round:
            return list(self.sampled[1])
        self.introduce(grid)
        nodes = list(grid.get_node_ids())
        seat = seats.seats(nodes, self.claims)
        nodes.sort(key=seat.__getitem__)
        wanted = self.cfg.federation.clients_per_round or len(nodes)
        rng = random.Random(self.cfg.seed * 7919 + server_round)
        chosen = sorted(rng.sample(nodes, min(wanted, len(nodes))))
        self.sampled = (server_round, chosen)
        return list(chosen)

    def may_train(self, nodes: Sequence[int]) -> list[int]:
        """Partitions these nodes may hold: known ones, and for an unknown node any partition
        no node that replied to this process holds (a resumed run's nodes may be new ids for
        the partitions its checkpoint knew: a simulation gives them fresh ones)."""
        known = self.node_partitions
        parts = {known[n] for n in nodes if n in known}
        if any(n not in known for n in nodes):
            held = {known[n] for n in self.seen if n in known}
            parts |= set(range(self.cfg.data.num_clients)) - held
        return sorted(parts)

    # -- training: download ----------------------------------------------------------------------
    def download(self, node: int) -> tuple[ArrayRecord, dict[str, Any]]:
        """The global factors for `node` (cut to its rank once known) and extra config entries.

        A merged delta (flora) always travels whole; under fedsa only A travels.
        """
        down = Download(self.node_ranks.get(node), dict(self.global_))
        for f in self.features:  # the node's plan first, whatever the features' order
            down = f.assign(node, down)
        for f in self.features:
            down = f.download(node, down)
        factors, rank = down.factors, down.rank
        config = dict(down.config)
        if rank is not None and not self.spec.merge:
            scaling = self.cfg.client_scaling(rank)
            factors = {m: f.truncate(rank, scaling) for m, f in factors.items()}
            # the cut factors are at the node's α/r: the node must read them at that scaling,
            # not at the global one (else it rescales B a second time)
            config["global-scaling"] = scaling
        for f in self.features:
            if (record := f.encode(node, factors)) is not None:
                return record, config
        return wire.outgoing(factors, self.spec), config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each sampled node gets the global factors cut to its rank (full rank until known)."""
        messages = []
        for node in self.sample(server_round, grid):
            record, extra = self.download(node)
            config = ConfigRecord({**self.round_config(server_round), **extra})
            content = RecordDict({"global": record, "config": config})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    # -- training: replies -----------------------------------------------------------------------
    def read_reply(self, node: int, content: RecordDict) -> tuple[TrainReply, dict[str, Factors]]:
        """A reply's validated metrics and its factors at the global shapes (ValueError if bad)."""
        return read_reply(
            node,
            content,
            cfg=self.cfg,
            spec=self.spec,
            shapes=self.shapes,
            features=self.features,
            global_=self.global_,
            held=self.node_partitions.get(node),
            max_bytes=self.max_reply_bytes,
        )

    def remember(self, node: int, reply: TrainReply) -> None:
        """What the server learns of a node from a reply: its rank and its partition."""
        self.node_ranks[node] = reply.rank
        self.node_partitions[node] = reply.partition
        self.node_seats = seats.seated(self.node_seats, node=node, partition=reply.partition)
        self.seen.add(node)

    def train_round(
        self, server_round: int, replies: Iterable[Message], *, sampled: int
    ) -> RoundResult:
        """Screen the replies, aggregate the accepted ones, keep the new global adapter."""
        rows: list[ClientRow] = []
        parsed: dict[int, tuple[TrainReply, dict[str, Factors]]] = {}
        replies = list(replies)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                why = short_reason(msg.error.reason)  # the row keeps the whole report
                log.warning("round %d: node %s failed: %s", server_round, node, why)
                rows.append(ClientRow(server_round, node, "failed", reason=msg.error.reason))
                continue
            try:
                parsed[node] = self.read_reply(node, msg.content)
            except Exception as err:  # anything a client sends must not end the round
                known, may_hold = self.node_partitions.get(node), self.may_train([node])
                rows.append(
                    malformed_row(server_round, node=node, err=err, known=known, may_hold=may_hold)
                )
        refuse_shared_partitions(server_round, parsed=parsed, rows=rows)
        known = (dict(self.node_ranks), dict(self.node_partitions), set(self.seen), self.node_seats)
        accepted = self.screen(server_round, parsed=parsed, rows=rows)
        result = RoundResult(sampled=sampled, rows=rows, replies=len(replies))
        if not accepted:
            log.warning("round %d: no acceptable update; the global is unchanged", server_round)
            return result
        weights = [self.weight(parsed[n][0]) for n in accepted]
        inputs = [parsed[n][1] for n in accepted]
        try:  # the accepted updates through the features and the aggregator: never the run
            for f in self.features:  # e.g. coverage weights for pruned clients, the DP release
                inputs, weights = f.release(accepted, inputs, weights=weights, global_=self.global_)
            new_global, new_state = self.aggregate(server_round, inputs=inputs, weights=weights)
            refused = self.commit(server_round, new_global=new_global, new_state=new_state)
        except Exception as err:  # what the accepted updates did to the aggregator: not the run
            log.warning("round %d: the aggregator failed", server_round, exc_info=True)
            result.aggregator_error = f"{type(err).__name__}: {err}"
            refused = f"aggregate refused ({result.aggregator_error}): the global is unchanged"
        if refused is not None:  # every accepted update is in it: none can be told to blame
            for row in rows:
                if row.status == "ok":
                    log.warning("round %d: rejected node %s: %s", server_round, row.node, refused)
                    row.status, row.reason = "rejected", refused
            # a refused round teaches the server nothing (the ranks and partitions it claimed)
            self.node_ranks, self.node_partitions, self.seen, self.node_seats = known
            return result
        for n in accepted if not self.private else []:  # a private run keeps none
            reply, update = parsed[n]
            self.client_updates[reply.partition] = (server_round, update)
        losses = [(self.weight(r), r.train_loss) for r in (parsed[n][0] for n in accepted)]
        losses = [(w, x) for w, x in losses if x is not None]  # a private reply sends no loss
        if losses:
            result.train_loss = sum(w * x for w, x in losses) / sum(w for w, _ in losses)
        return result

    def weight(self, reply: TrainReply) -> float:
        """A reply's aggregation weight: 1, or its example count (checked in `read_reply`)."""
        if self.cfg.aggregator.weighting == "uniform":
            return 1.0
        return float(reply.num_examples)

    def screen(
        self,
        server_round: int,
        *,
        parsed: Mapping[int, tuple[TrainReply, dict[str, Factors]]],
        rows: list[ClientRow],
    ) -> list[int]:
        """The nodes whose updates pass screening (shape, rank, finiteness, norm); a row each."""
        ok, rejected = screen(
            {str(n): u for n, (_, u) in parsed.items()},
            shapes=self.shapes,
            max_rank=self.max_rank,
            max_norm_ratio=self.max_norm_ratio,
            quote_median=not self.private,  # another client's norm
        )
        for node, reason in rejected.items():
            log.warning("round %d: rejected node %s: %s", server_round, node, reason)
            reply = parsed[int(node)][0]
            rows.append(
                ClientRow(server_round, int(node), "rejected", reply, reply.partition, reason)
            )
        accepted = [int(n) for n in ok]
        for node in accepted:
            reply = parsed[node][0]
            self.remember(node, reply)  # a rejected reply teaches the server nothing
            for f in self.features:
                try:  # what a feature learns from a reply (a bandit's reward) must not end the run
                    f.accepted(node, reply)
                except Exception:
                    log.exception(
                        "round %d: features.%s failed on node %s", server_round, f.name, node
                    )
            fields: dict[str, Any] = {}
            for f in self.features:  # checked in `read_reply`
                fields |= declared_metrics(reply, f.reply_metrics)
            rows.append(ClientRow(server_round, node, "ok", reply, reply.partition, fields=fields))
        return accepted

    def aggregate(
        self, server_round: int, *, inputs: Sequence[Mapping[str, Factors]], weights: list[float]
    ) -> tuple[dict[str, Factors], dict[str, dict[str, torch.Tensor]]]:
        """The recipe's aggregator, module by module: (new global, new aggregator state)."""
        return aggregate_modules(
            self.aggregate_fn,
            inputs,
            weights=weights,
            modules=sorted(self.shapes),
            global_rank=self.cfg.aggregator.global_rank,
            states=self.agg_state,
            seed=self.cfg.seed + server_round,
            options=wire.server_options(self.spec, self.cfg.aggregator.options),
        )

    def commit(
        self,
        server_round: int,
        *,
        new_global: dict[str, Factors],
        new_state: dict[str, dict[str, torch.Tensor]],
    ) -> str | None:
        """Keep an aggregate as the new global after the features' post-processing (None), or
        refuse it with the reason, logged: the previous global and every state stay
        (`aggregation.post_process`)."""
        new_global, problem = post_process(
            self.features,
            global_=self.global_,
            new_global=new_global,
            new_state=new_state,
            server_round=server_round,
        )
        if problem is not None:
            why = f"aggregate refused ({problem}): the global adapter is unchanged"
            log.warning("round %d: %s", server_round, why)
            return why
        self.global_, self.agg_state = new_global, new_state
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's entry point: `train_round`, summarised as (global record, metrics)."""
        replies = list(replies)
        result = self.train_round(server_round, replies, sampled=len(replies))
        if result.train_loss is None:
            return None, None
        summary = {
            "clients": len(result.ok),
            "rejected": len(result.rows) - len(result.ok),
            "train-loss": result.train_loss,
            "global-rank": max(f.rank for f in self.global_.values()),
        }
        return self.global_record(), MetricRecord(summary)

    # -- evaluation ------------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's evaluation panel (`federation.evaluate_clients`: every node by default,
        the same seeded nodes each round) evaluates the global adapter on its held-out splits."""
        config = ConfigRecord(self.round_config(server_round))
        content = RecordDict({"global": arrays, "config": config})
        spec, seed = self.cfg.federation.evaluate_clients, self.cfg.seed
        self.introduce(grid)
        nodes = list(grid.get_node_ids())
        panel = evaluation_panel(nodes, spec=spec, seed=seed, seats=seats.seats(nodes, self.claims))
        return [
            Message(content, dst_node_id=node, message_type=MessageType.EVALUATE) for node in panel
        ]

    def evaluate_round(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[tuple[float, int] | None, list[EvalRow], dict[int, str]]:
        """((token-weighted held-out loss, tokens) or None, one row per client, why each
        dropped reply was dropped): `evaluation.evaluate_round`."""
        return evaluate_round(
            list(replies),
            server_round=server_round,
            cfg=self.cfg,
            partitions=self.node_partitions,
            declared=self.eval_metrics,
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Flower's entry point: the token-weighted global held-out loss."""
        loss, _, _ = self.evaluate_round(server_round, replies)
        return None if loss is None else MetricRecord({"held-out-loss": loss[0], "tokens": loss[1]})

    def summary(self) -> None:
        """One log line naming the aggregator, the largest rank and the module count."""
        log.info(
            "LoraStrategy: aggregator=%s, ranks up to %d, %d modules",
            self.cfg.aggregator.name,
            self.max_rank,
            len(self.shapes),
        )
