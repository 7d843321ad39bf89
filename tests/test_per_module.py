"""fedllm.aggregators.per_module: modules aggregated two at a time give what one at a time gives,
each worker runs on its share of the threads, and the caller keeps its own thread count."""

from __future__ import annotations

import threading

import pytest
import torch

from fedllm.aggregators import Factors, get
from fedllm.aggregators.per_module import map_modules


def test_two_at_a_time_matches_one_at_a_time_for_a_real_aggregator() -> None:
    g = torch.Generator().manual_seed(0)
    modules = [f"layers.{i}.q_proj" for i in range(5)]
    updates = {
        m: [Factors(torch.randn(32, r, generator=g), torch.randn(r, 24, generator=g), 2.0 / r)
            for r in (2, 4, 8)]
        for m in modules
    }  # fmt: skip
    squeeze = get("svd")

    def one(m: str):
        return squeeze(updates[m], [1.0, 2.0, 3.0], global_rank=4, seed=1).global_

    serial = map_modules(one, modules, workers=1)
    paired = map_modules(one, modules, workers=2)
    assert list(paired) == modules  # the callers' order
    for m in modules:
        torch.testing.assert_close(paired[m].B @ paired[m].A, serial[m].B @ serial[m].A)


def test_workers_run_on_their_share_of_threads_and_the_caller_keeps_its_own() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: dict[str, tuple[int, str]] = {}

        def probe(m: str) -> int:
            seen[m] = (torch.get_num_threads(), threading.current_thread().name)
            return len(m)

        assert map_modules(probe, ["a", "bb", "ccc"], workers=2) == {"a": 1, "bb": 2, "ccc": 3}
        assert {n for n, _ in seen.values()} == {1}  # 2 cores // 2 workers
        assert all(name.startswith("aggregate") for _, name in seen.values())
        assert torch.get_num_threads() == 2
        # one module, or one worker: in the caller's thread, at its count
        map_modules(probe, ["d"], workers=2)
        assert seen["d"] == (2, threading.current_thread().name)
    finally:
        torch.set_num_threads(before)


def test_an_error_in_a_module_reaches_the_caller_and_workers_must_be_positive() -> None:
    def boom(m: str) -> None:
        if m == "b":
            raise ValueError("module b is malformed")

    with pytest.raises(ValueError, match="module b"):
        map_modules(boom, ["a", "b", "c"], workers=2)
    with pytest.raises(ValueError, match="workers"):
        map_modules(boom, ["a"], workers=0)
