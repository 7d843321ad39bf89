"""Talking to the nodes with progress: push messages, pull replies one by one, say what came back.

Output goes to stdout, flushed, prefixed `[fedllm]`: Ray and pipes buffer otherwise, and the
person watching should see clients finish one by one.

The deadline (`federation.round_timeout`) is the same in every engine: counted from the push,
and each message's TTL ends with it, so Flower's SuperLink (simulation and deployment alike)
never hands a node an instruction that is already stale (a slow node does not fall a round
behind) and refuses a reply that comes after it. A reply not in by the deadline, or one Flower
reports as expired, is missed: left out, and said with its node id (a node that misses every
round while connected may be a stuck SuperNode: docs/deployment.md, Failures); the round goes on
with the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedllm.errors import short_reason
from fedllm.features.types import EvalRow, TrainReply
from fedllm.model.packing import pack


def say(text: str) -> None:
    """Progress for the person watching (stdout, flushed: Ray and pipes buffer otherwise)."""
    print(f"[fedllm] {text}", flush=True)


def wait_for_nodes(grid: Grid, wanted: int, *, timeout: float) -> int:
    """Wait (bounded) until `wanted` nodes are connected; returns how many are."""
    deadline = time.monotonic() + timeout
    while (n := len(list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
    return n


# what Flower's SuperLink answers for a message whose TTL ran out before a reply was stored
EXPIRED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def expired(reply: Message) -> bool:
    """Whether `reply` is Flower's word that the message expired unanswered (a missed deadline)."""
    return reply.has_error() and reply.error.code in EXPIRED


def end_ttl_at(messages: list[Message], deadline: float) -> None:
    """Make every message expire at `deadline` (Unix time) unless it expires sooner."""
    for m in messages:
        m.metadata.ttl = min(m.metadata.ttl, deadline - m.metadata.created_at)


def exchange(
    grid: Grid,
    messages: list[Message],
    *,
    timeout: float,
    label: str,
    describe: Callable[[Message], str] | None = None,
) -> list[Message]:
    """Push `messages`, then pull replies until all are in or `timeout` (from the push) passes,
    reporting each one; the messages expire at the deadline and a late reply is missed.

    The same as `grid.send_and_receive`, but the person watching sees clients finish one by one,
    and each message's arrays travel packed as one (`fedllm.model.packing`; replies are unpacked
    where they are read).
    No message (an empty evaluation panel) asks the grid nothing.
    """
    if not messages:
        return []
    for m in messages:  # built for this push: their arrays travel as one Flower array
        m.content = pack(m.content)
    deadline = time.monotonic() + timeout
    end_ttl_at(messages, time.time() + timeout)
    # the ids of the messages the grid stored: Flower's grids set each message's id before the
    # push, and leave out (in memory), put None for (deployment) or return none at all (a push
    # refused as too large) the ones they could not store, which are missed
    pushed = {i for i in grid.push_messages(messages) if i}
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    pending = pushed & node_of.keys()
    replies: list[Message] = []
    missed = [node for i, node in node_of.items() if i not in pending]
    while True:  # pull at least once: a grid that runs its nodes inside the push has answers
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            if expired(reply):
                missed.append(node_of[reply.metadata.reply_to_message_id])
                continue
            replies.append(reply)
            if reply.has_error():  # the whole report stays in metrics.jsonl's row
                detail = f"failed: {short_reason(reply.error.reason)}"
            else:
                detail = describe(reply) if describe else "done"
            say(f"{label}: client {len(replies)}/{len(messages)} {detail}")
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if missed := sorted(missed + [node_of[i] for i in pending]):
        say(
            f"{label}: {len(missed)} of {len(messages)} clients missed the deadline "
            f"(federation.round_timeout={timeout:g}s; node {', '.join(map(str, missed))}); "
            "going on without them"
        )
    return replies


def describe_train(reply: Message) -> str:
    """One line about a training reply: partition, rank, loss first → last, time."""
    try:
        r = TrainReply.parse(reply.content["metrics"])
    except (KeyError, ValueError, TypeError) as err:
        return f"sent malformed metrics ({err})"
    loss = ""
    if r.train_loss_first is not None and r.train_loss_last is not None:
        loss = f" loss {r.train_loss_first:.3f} -> {r.train_loss_last:.3f} in"
    seconds = "" if r.train_seconds is None else f", {r.train_seconds:.0f}s"
    return f"(partition {r.partition}, rank {r.rank}):{loss} {r.steps} steps{seconds}"


def describe_evaluation(
    reply: Message, *, private: bool, declared: Mapping[str, Any] | None = None
) -> str:
    """One line about an evaluation reply: partition and held-out loss, and the features'
    `declared` evaluation metrics it carries (a private run keeps per-client losses out of its
    log, as out of its files)."""
    try:
        row = EvalRow.parse(0, reply.content["metrics"], declared=declared)
    except (KeyError, ValueError, TypeError) as err:
        return f"sent malformed metrics ({err})"
    if private:  # not even whether its held-out split is empty (h107)
        return f"(partition {row.partition})"
    if row.tokens == 0:
        return f"(partition {row.partition}): no held-out examples"
    extras = "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in row.extra.items())
    return f"(partition {row.partition}): held-out loss {row.held_out_loss:.4f}{extras}"
