"""Talking to the nodes with progress: push messages, pull replies one by one, say what came back.

Output goes to stdout, flushed, prefixed `[fedllm]`: Ray and pipes buffer otherwise, and the
person watching should see clients finish one by one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Message
from flwr.serverapp import Grid

from fedllm.features.types import TrainReply


def say(text: str) -> None:
    """Progress for the person watching (stdout, flushed: Ray and pipes buffer otherwise)."""
    print(f"[fedllm] {text}", flush=True)


def wait_for_nodes(grid: Grid, wanted: int, *, timeout: float) -> int:
    """Wait (bounded) until `wanted` nodes are connected; returns how many are."""
    deadline = time.monotonic() + timeout
    while (n := len(list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
    return n


def exchange(
    grid: Grid,
    messages: list[Message],
    *,
    timeout: float,
    label: str,
    describe: Callable[[Message], str] | None = None,
) -> list[Message]:
    """Push `messages`, then pull replies until all are in or `timeout` passes, reporting each one.

    The same as `grid.send_and_receive`, but the person watching sees clients finish one by one.
    No message (an empty evaluation panel) asks the grid nothing.
    """
    if not messages:
        return []
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            if reply.has_error():
                detail = f"failed: {reply.error.reason}"
            else:
                detail = describe(reply) if describe else "done"
            say(f"{label}: client {len(replies)}/{len(messages)} {detail}")
        if pending:
            time.sleep(0.2)
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
