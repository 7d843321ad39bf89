"""An in-process Flower Grid: every pushed message is delivered to a ClientApp straight away.

For benchmarks and tests that run many short federations on one CPU. The ServerApp round loop
(`run_server`), LoraStrategy and ClientApp are the ones `fedllm run` uses, and every message is
serialised to Flower's protobuf and back in each direction, as on the wire; only Ray's process
start-up and scheduling are left out. Each node keeps one Context, so `context.state` persists
across rounds as in Flower's simulation engine. Nodes run one after another.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedllm.recipe import RunConfig

log = logging.getLogger("fedllm.deploy.local_grid")


def wire(message: Message) -> Message:
    """The message as the other side receives it: through Flower's protobuf serialisation."""
    return message_from_proto(message_to_proto(message))


class LocalGrid(Grid):
    """`num_nodes` nodes (ids 1001, 1002, …) with partition-ids 0…n−1, served by `app`."""

    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        *,
        node_config: Mapping[int, Mapping[str, int | float | str]] | None = None,
        run_id: int = 1,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self._app = app
        self._run = Run.create_empty(run_id)
        self.contexts: dict[int, Context] = {}
        for pid in range(num_nodes):
            config = {"partition-id": pid, "num-partitions": num_nodes}
            config.update((node_config or {}).get(pid, {}))
            self.contexts[1001 + pid] = Context(
                run_id=run_id,
                node_id=1001 + pid,
                node_config=config,
                state=RecordDict(),
                run_config={},
            )
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def app_for(self, node: int) -> ClientApp:
        """The ClientApp that answers `node` (one for every node here)."""
        return self._app

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; the reply waits for `pull_messages`."""
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                raise ValueError(f"no node {node}; nodes: {list(self.contexts)}")
            message_id = uuid4().hex
            msg.metadata.__dict__["_message_id"] = message_id  # as Flower's InMemoryGrid does
            received = wire(msg)
            received.metadata.__dict__["_message_id"] = message_id  # serde drops the id
            try:
                reply = self.app_for(node)(received, self.contexts[node])
            except Exception as err:  # a failing client becomes an error reply, as in Flower
                log.exception("node %s failed", node)
                reply = Message(
                    Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=received
                )
            self._replies[message_id] = wire(reply)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull: every reply is there once pushed, so `timeout` is never waited on."""
        return self.pull_messages(self.push_messages(messages))


@contextmanager
def server_identity(run_id: int) -> Iterator[None]:
    """Set the process's Flower task identity as a ServerApp runtime does (Message needs the
    run id), and restore the previous one afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 1
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_local(cfg: RunConfig, *, resume: bool = False) -> tuple[Path, LocalGrid]:
    """Run the recipe's federation through `run_server` on a LocalGrid; (run dir, grid). The
    server and its clients share one process, so they share its cache (one base in memory)."""
    from fedllm.client.app import make_client_app
    from fedllm.data.shards import ProcessCache
    from fedllm.server.app import run_server

    cache = ProcessCache()
    grid = LocalGrid(make_client_app(cfg, cache=cache), cfg.data.num_clients)
    with server_identity(grid.run.run_id):
        return run_server(grid, cfg, resume=resume, cache=cache), grid
