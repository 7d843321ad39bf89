"""Reading a training reply, as plain functions: its size, its metrics, what it claims (its
partition and weight against the recipe and the node's earlier replies), its factors through the
features' decode/receive hooks, one partition per node in a round, and FFA's frozen A (the
server's own, never the one a client sent). `LoraStrategy` and the SecAgg+ round
(`privacy/secagg_server.py`) both use them; a ValueError is a rejection with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from flwr.app import ArrayRecord, RecordDict

from fedllm.aggregators.base import Factors, RoundSpec
from fedllm.features.base import Feature, allowed_metrics
from fedllm.features.types import ClientRow, TrainReply, declared_metrics
from fedllm.model import packing, wire
from fedllm.recipe.schema import RunConfig

log = logging.getLogger("fedllm.server")


def check_claims(reply: TrainReply, *, cfg: RunConfig, held: int | None) -> None:
    """A reply's partition and weight against the recipe and the partition the node held
    before (`held`, None if unknown); ValueError naming the key."""
    n, cap = cfg.data.num_clients, cfg.data.max_examples
    if reply.partition >= n:
        raise ValueError(f"partition-id {reply.partition} outside the recipe's [0, {n})")
    if held is not None and reply.partition != held:  # a node's partition-id is fixed
        raise ValueError(f"partition-id {reply.partition}, but the node held {held} before")
    if cap is not None and (reply.num_examples or 0) > cap:  # a weight the server can bound
        raise ValueError(f"num-examples {reply.num_examples} above data.max_examples={cap}")
    if cfg.aggregator.weighting == "examples" and reply.num_examples is None:
        raise ValueError("no 'num-examples': aggregator.weighting=examples needs it")


def read_reply(
    node: int,
    content: RecordDict,
    *,
    cfg: RunConfig,
    spec: RoundSpec,
    shapes: Mapping[str, tuple[int, int]],
    features: Sequence[Feature],
    global_: Mapping[str, Factors],
    held: int | None,
    max_bytes: int,
) -> tuple[TrainReply, dict[str, Factors]]:
    """A reply's validated metrics and its factors at the global `shapes` (ValueError if bad):
    at most `max_bytes` of arrays, claims checked against the partition the node `held`, the
    factors decoded by the first feature that can (else `wire.read_update`) and passed through
    every feature's `receive`; float32 at the claimed rank; FFA's A replaced by the global one."""
    size = sum(r.count_bytes() for r in content.array_records.values())
    if size > max_bytes:
        raise ValueError(f"{size} bytes of arrays, more than any valid reply ({max_bytes})")
    content = packing.unpack(content)  # a new RecordDict: the reply itself stays as sent
    for key in ("update", "kept"):
        if key in content and not isinstance(content[key], ArrayRecord):
            raise ValueError(f"'{key}' must be an array record, got {type(content[key]).__name__}")
    reply = TrainReply.parse(allowed_metrics(content["metrics"], features))
    check_claims(reply, cfg=cfg, held=held)
    scaling = cfg.client_scaling(reply.rank)  # α/r from the recipe, not trusted
    update = None
    for f in features:
        if (update := f.decode(node, content, rank=reply.rank)) is not None:
            break
    if update is None:
        update = wire.read_update(content["update"], scaling=scaling, spec=spec, shapes=shapes)
    for f in features:
        update = f.receive(node, content, factors=update, reply=reply, shapes=shapes)
        declared_metrics(reply, f.reply_metrics)  # a bad declared metric rejects the reply
    if any(f.B.dtype != torch.float32 for f in update.values()):
        dtypes = sorted({str(f.B.dtype) for f in update.values()})
        raise ValueError(f"factors in dtype {dtypes}, expected float32 (the wire dtype)")
    if any(f.rank != reply.rank for f in update.values()):
        raise ValueError(f"claims rank {reply.rank} but sent factors of other ranks")
    if spec.freeze_A:  # the server's own frozen A, never one a client sent
        update = {m: frozen_A(global_, m, f=f) for m, f in update.items()}
    return reply, update


def malformed_row(
    server_round: int, *, node: int, err: Exception, known: int | None, may_hold: Sequence[int]
) -> ClientRow:
    """The rejected row of a reply that could not be read (logged): the partition the node held
    before (`known`), and the partitions it may have trained on (`may_hold`, for DP charges)."""
    log.warning("round %d: node %s sent a malformed reply: %s", server_round, node, err)
    row = ClientRow(
        server_round, node, "rejected", partition=known, reason=f"malformed reply: {err}"
    )
    row.may_hold = tuple(may_hold)
    return row


def shared_partitions(claims: Mapping[int, int]) -> dict[int, str]:
    """node -> why, for every node whose partition (`claims`: node -> partition) another node
    claims in the same round: one of them lies, or two SuperNodes were started with the same
    partition-id; neither can be told apart."""
    by_partition: dict[int, list[int]] = {}
    for node, pid in claims.items():
        by_partition.setdefault(pid, []).append(node)
    return {
        node: f"partition-id {pid} claimed by nodes {sorted(nodes)} in one round"
        for pid, nodes in by_partition.items()
        if len(nodes) > 1
        for node in nodes
    }


def refuse_shared_partitions(
    server_round: int,
    *,
    parsed: dict[int, tuple[TrainReply, dict[str, Factors]]],
    rows: list[ClientRow],
) -> None:
    """Move every reply of a partition two nodes claim in one round (`shared_partitions`) from
    `parsed` to a rejected row."""
    shared = shared_partitions({node: reply.partition for node, (reply, _) in parsed.items()})
    for node, reason in shared.items():
        log.warning("round %d: rejected node %s: %s", server_round, node, reason)
        reply, _ = parsed.pop(node)
        rows.append(ClientRow(server_round, node, "rejected", reply, reply.partition, reason))


def frozen_A(global_: Mapping[str, Factors], module: str, *, f: Factors) -> Factors:
    """`f` with the A it was sent, whatever A it sent: the global A's first rows, zero rows past
    them (a rank above the global's). It kept a client's zero columns (for pruned clients, which
    FFA refuses since stop 44), and its own A above the global's rows: either made the aggregator
    raise every round and the run stop after three (h104, h105)."""
    g = global_.get(module)
    if g is None or g.A.shape[1] != f.A.shape[1]:
        return f  # not a slice of the global A: the aggregator's own check refuses it
    return Factors(f.B, g.truncate(f.rank).A.to(f.A.dtype), f.scaling)  # zero rows past it
