"""The round loop (`fedllm.server.app`) through a real federation on the in-process grid: an
aggregator that raises on every round's accepted updates ends the run after
`AGGREGATOR_FAILURES` rounds, its rounds checkpointed, and a resume after the fix goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.deploy.local_grid import run_local
from fedllm.errors import RunFailed
from fedllm.features.base import Feature
from fedllm.features.types import ClientRow, RoundResult
from fedllm.recipe import load_recipe
from fedllm.server.app import AGGREGATOR_FAILURES, aggregator_failures, record_features
from fedllm.server.metrics import MetricsLog
from fedllm.server.strategy import LoraStrategy

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"

OVERRIDES = [
    "name=bug",
    "data.max_examples=90",
    "data.num_clients=2",
    "data.max_length=32",
    "lora.ranks=[2,4]",
    "federation.local_steps=1",
    "federation.rounds=4",
]


class Adds(Feature):
    name = "adds"

    def record(self, result: RoundResult, *, server_row: dict) -> None:
        server_row["adds_count"] = len(result.rows)  # a key of its own
        result.rows.append(ClientRow(server_row["round"], 9, "missed"))


class Overwrites(Feature):
    name = "overwrites"

    def record(self, result: RoundResult, *, server_row: dict) -> None:
        server_row["train_loss"] = 0.0  # would pass for the clients' loss
        server_row.pop("clients_ok")


def test_features_record_may_add_but_not_change_the_servers_columns(tmp_path: Path) -> None:
    cfg = load_recipe(RECIPE, [f"output_dir={tmp_path}", *OVERRIDES])
    result = RoundResult(sampled=2, rows=[])
    row: dict = {"round": 1, "train_loss": 3.5, "clients_ok": 2}
    record_features([Adds(cfg)], result, server_row=row)
    assert row == {"round": 1, "train_loss": 3.5, "clients_ok": 2, "adds_count": 0}
    assert [r.status for r in result.rows] == ["missed"]
    with pytest.raises(
        ValueError, match=r"^features\.overwrites: .*\['clients_ok', 'train_loss'\]"
    ):
        fresh = {"round": 2, "train_loss": 3.5, "clients_ok": 2}
        record_features([Adds(cfg), Overwrites(cfg)], result, server_row=fresh)


def test_failures_count_rounds_running_and_a_good_round_resets_them(tmp_path: Path) -> None:
    cfg = load_recipe(RECIPE, [f"output_dir={tmp_path}", *OVERRIDES])
    bad = RoundResult(sampled=2, rows=[], aggregator_error="IndexError: boom")
    good = RoundResult(sampled=2, rows=[])
    count = 0
    for rnd, result in enumerate([bad, bad, good, bad, bad], start=1):
        count = aggregator_failures(count, result, cfg=cfg, server_round=rnd)
    assert count == 2  # the good round 3 reset the two before it
    with pytest.raises(RunFailed, match=r"^round 6: the aggregator raised 3 rounds running"):
        aggregator_failures(count, bad, cfg=cfg, server_round=6)


@pytest.mark.slow  # a federation
def test_an_aggregator_that_raises_every_round_stops_the_run_and_a_resume_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # before: each round was refused alone and the run "finished" having trained nothing
    cfg = load_recipe(RECIPE, [f"output_dir={tmp_path}", *OVERRIDES])

    def buggy(self, server_round, *, inputs, weights):
        raise IndexError("list index out of range")

    with monkeypatch.context() as patch:
        patch.setattr(LoraStrategy, "aggregate", buggy)
        with pytest.raises(RunFailed) as stopped:
            run_local(cfg)
    assert AGGREGATOR_FAILURES == 3
    message = str(stopped.value)
    assert message.startswith("round 3: the aggregator raised 3 rounds running (IndexError")
    assert "aggregator 'svd'" in message and "--resume" in message
    rows = MetricsLog(cfg.run_dir).read()
    assert [r["round"] for r in rows if r["kind"] == "server"] == [0, 1, 2, 3]  # each checkpointed
    clients = [r for r in rows if r["kind"] == "client" and r.get("phase") != "eval"]
    assert {(r["round"], r["status"]) for r in clients} == {(n, "rejected") for n in (1, 2, 3)}
    # the fix (here: the real aggregator back), then --resume: round 4 trains and is kept
    run_dir, _ = run_local(cfg, resume=True)
    rows = MetricsLog(run_dir).read()
    last = [r for r in rows if r["kind"] == "client" and r["round"] == 4 and "status" in r]
    assert last and {r["status"] for r in last} == {"ok"}
    assert [r["round"] for r in rows if r["kind"] == "server"] == [0, 1, 2, 3, 4]
