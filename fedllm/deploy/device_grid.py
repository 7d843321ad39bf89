"""An in-process grid whose nodes are devices working side by side: deadlines as in a federation.

`LocalGrid` runs the nodes one after another inside the push, so every reply is already there
when the server pulls and `federation.round_timeout` never bites. This grid still runs them one
after another (each node has the machine to itself, so its time is its own), but times each
reply as if every node had started at the push on its own machine: a reply that took longer than
its message's TTL (the round's deadline, set by `fedllm.server.exchange`) is refused, and the
server pulls what Flower's SuperLink answers for a message that expired unanswered. A node that
misses one round starts the next one fresh, as with a SuperLink that dropped its stale message.

Each node has its own ClientApp, and so its own `ProcessCache`: it keeps its loaded base and
pruned base between messages, as a device keeps its own memory, instead of rebuilding them
whenever the node before it needed another one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_ins_message

from fedllm.client.node_config import DEVICE_KEYS
from fedllm.deploy.local_grid import LocalGrid, server_identity
from fedllm.recipe import RunConfig


class DeviceGrid(LocalGrid):
    """`LocalGrid` with one ClientApp per node (`apps[i]` serves partition i) and per-node
    timing against each message's TTL."""

    def __init__(
        self,
        apps: Sequence[ClientApp],
        *,
        node_config: Mapping[int, Mapping[str, int | float | str]] | None = None,
        run_id: int = 1,
    ) -> None:
        if not apps:
            raise ValueError("DeviceGrid needs one ClientApp per node, got none")
        super().__init__(apps[0], len(apps), node_config=node_config, run_id=run_id)
        self.apps = dict(zip(self.contexts, apps, strict=True))  # node id -> its app
        self.seconds: dict[str, float] = {}  # message id -> the node's time to answer it

    def app_for(self, node: int) -> ClientApp:
        """`node`'s own ClientApp (with its own cache)."""
        return self.apps[node]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each node answers in turn; a reply later than its message's expiry (counted from
        this push, as if the nodes had worked side by side) is refused."""
        pushed, ids = time.time(), []
        for msg in messages:
            t0 = time.perf_counter()
            (message_id,) = super().push_messages([msg])
            took = self.seconds[message_id] = time.perf_counter() - t0
            if pushed + took > msg.metadata.created_at + msg.metadata.ttl:
                self._replies[message_id] = create_message_error_unavailable_ins_message(
                    message_id, self.run.run_id
                )
            ids.append(message_id)
        return ids


def run_devices(
    cfg: RunConfig,
    *,
    node_config: Mapping[int, Mapping[str, int | float | str]] | None = None,
    resume: bool = False,
) -> tuple[Path, DeviceGrid]:
    """Run the recipe's federation through `run_server` on a DeviceGrid; (run dir, grid).
    `node_config` adds keys (e.g. a device's `slowdown`) to partitions' node configs."""
    from fedllm.client.app import make_client_app
    from fedllm.server.app import run_server

    keyed = sorted({k for keys in (node_config or {}).values() for k in keys if k in DEVICE_KEYS})
    if keyed and cfg.devices is None:
        raise ValueError(
            f"node config {', '.join(keyed)} emulate a device, which needs the recipe's "
            "`devices` section (e.g. devices=[{clients: N}])"
        )
    apps = [make_client_app(cfg) for _ in range(cfg.data.num_clients)]  # a cache per device
    grid = DeviceGrid(apps, node_config=node_config)
    with server_identity(grid.run.run_id):
        return run_server(grid, cfg, resume=resume), grid
