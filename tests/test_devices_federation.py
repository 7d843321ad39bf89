"""Emulated devices and the round deadline in Flower's real simulation engine (Ray): one round of
the tiny federation with the bandit, where one client cannot fit the first arm in its memory, one
is far too slow for the deadline and one is plain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.constrained.devices import MEMORY_REFUSAL
from fedllm.server.checkpoint import load_checkpoint

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
pytestmark = pytest.mark.slow


def test_a_miss_and_a_memory_refusal_in_a_simulated_round_teach_the_bandit(tmp_path: Path) -> None:
    # client 0: 5 MiB, between what rank 2 needs on the tiny base unpruned (~5.7 MiB) and pruned
    # (~4.2 MiB) at batch 8, length 48; client 1: 100000x slower, so it sleeps to just past the
    # deadline and Flower refuses its late reply; client 2: plain
    devices = "[{clients: 1, memory_mb: 5.0}, {clients: 1, slowdown: 100000}, {clients: 1}]"
    code = main(
        [
            "run", RECIPE, f"output_dir={tmp_path}", "name=d", "federation.rounds=1",
            "federation.local_steps=4", "federation.round_timeout=25",
            "simulation.num_cpus_per_client=1", "lora.ranks=2",
            "adaptive={ranks: [2, 4], pruning: [0.0, 0.5]}", f"devices={devices}",
        ]
    )  # fmt: skip
    assert code == 0  # a round with a miss and a failure goes on
    rows = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r["kind"] == "client"]
    assert sorted(r["status"] for r in clients) == ["failed", "missed", "ok"]
    assert all((r["arm_rank"], r["arm_pruning"]) == (2, 0.0) for r in clients)  # UCB: arm 0
    (refused,) = [r for r in clients if r["status"] == "failed"]
    assert MEMORY_REFUSAL in refused["reason"]
    (missed,) = [r for r in clients if r["status"] == "missed"]
    assert "federation.round_timeout=25s" in missed["reason"]
    (server,) = [r for r in rows if r["kind"] == "server" and r["round"] == 1]
    assert (server["clients_ok"], server["clients_failed"], server["clients_missed"]) == (1, 1, 1)
    adaptive = load_checkpoint(tmp_path / "d")["adaptive"]
    bandit = adaptive["bandit"]
    assert bandit["forbidden"] == {str(refused["node"]): [0]}  # never offered again
    # a miss in a node's first round (its base loaded inside the round) is not scored yet: the
    # node runs the same arm again next round, warm, and that round is scored
    assert missed["arm_new_base"] is True
    assert bandit["counts"][str(missed["node"])] == [0, 0, 0, 0]
    assert adaptive["replays"] == {str(missed["node"]): 0}
