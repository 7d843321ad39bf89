"""`federation.node_grace`: a round waits (bounded) for restarting nodes before it samples."""

from __future__ import annotations

import time

import pytest

from fedllm.recipe import ConfigError, build_config
from fedllm.server.exchange import wait_for_nodes


class RejoiningGrid:
    """A Grid whose third node reconnects after `after` polls."""

    def __init__(self, after: int) -> None:
        self.polls, self.after = 0, after

    def get_node_ids(self) -> list[int]:
        self.polls += 1
        return [1, 2, 3] if self.polls > self.after else [1, 2]


def test_the_wait_ends_when_the_node_rejoins_not_at_the_grace() -> None:
    grid = RejoiningGrid(after=2)
    t0 = time.monotonic()
    assert wait_for_nodes(grid, 3, timeout=60) == 3
    assert grid.polls == 3 and time.monotonic() - t0 < 10


def test_the_wait_is_bounded() -> None:
    """A node that never comes back: the wait gives up after the grace, not before, and
    returns how many nodes it has."""
    t0 = time.monotonic()
    assert wait_for_nodes(RejoiningGrid(after=10**6), 3, timeout=1.5) == 2
    assert 1.5 <= time.monotonic() - t0 < 30


def test_node_grace_is_a_non_negative_number_of_seconds() -> None:
    assert build_config({}).federation.node_grace == 0.0
    assert build_config({"federation": {"node_grace": 90}}).federation.node_grace == 90
    with pytest.raises(ConfigError, match="node_grace"):
        build_config({"federation": {"node_grace": -1}})
