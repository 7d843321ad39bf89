"""A node's feature state across a resume (fedllm.features.node_state): the newest file of a
finished round, so a round lost to a server crash starts again from the state before it, also
for a client next sampled rounds later."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedllm.aggregators import RoundSpec
from fedllm.features.node_state import (
    ATTEMPTS,
    decode_attempts,
    encode_attempts,
    restore_node_state,
    save_node_state,
)
from fedllm.features.types import ClientPlan, ClientRound
from fedllm.recipe import build_config


@pytest.fixture
def cfg(tmp_path: Path):
    return build_config({"data": {"num_clients": 2}, "output_dir": str(tmp_path), "name": "r"})


def at(cfg, server_round: int, state: RecordDict | None = None, attempts: str = "") -> ClientRound:
    plan = ClientPlan(1, 4)
    state = RecordDict() if state is None else state
    config = ConfigRecord({ATTEMPTS: attempts} if attempts else {})
    return ClientRound(cfg, 1, server_round, RoundSpec(), config, {}, state, 0, plan)


def keep(cfg, server_round: int, value: float, attempts: str = "") -> None:
    state = RecordDict({"res": ArrayRecord({"m": torch.full((2,), value)})})
    rnd = at(cfg, server_round, state, attempts)
    assert save_node_state(rnd, "res", uncovered=False) is not None


def restored(cfg, server_round: int, attempts: str = "", **kw) -> float | None:
    rnd = at(cfg, server_round, attempts=attempts)
    if not restore_node_state(rnd, "res", uncovered=False, **kw):
        return None
    return float(rnd.state["res"].to_torch_state_dict()["m"][0])


def test_a_round_run_again_after_a_crash_starts_from_the_state_before_it(cfg) -> None:
    keep(cfg, 5, 5.0)
    keep(cfg, 6, 6.0)  # round 6's clients trained, then the server died before its checkpoint
    assert restored(cfg, 6) == 5.0, "the resumed round 6 starts from round 5's state"
    assert restored(cfg, 7) == 6.0
    assert restored(cfg, 6, newest=True) == 6.0  # a privacy ledger counts the lost attempt
    keep(cfg, 6, 6.5)  # the rerun of round 6 replaces the lost attempt, keeps round 5's
    assert restored(cfg, 6) == 5.0 and restored(cfg, 7) == 6.5
    assert restored(cfg, 5) is None, "nothing from before round 5 is kept"


def test_a_config_record_state_and_a_torn_newest_file(cfg) -> None:
    for rnd, spent in ((1, [1.0]), (2, [1.0, 2.0])):
        state = RecordDict({"ledger": ConfigRecord({"spent": spent})})
        save_node_state(at(cfg, rnd, state), "ledger", uncovered=False)
    folder = cfg.run_dir / "clients" / "1" / "node_state"
    assert sorted(p.name for p in folder.iterdir()) == ["ledger.json", "ledger.prev.json"]
    (folder / "ledger.json").write_text('{"round": "2", "sta')  # torn
    rnd = at(cfg, 3)
    assert restore_node_state(rnd, "ledger", uncovered=False)  # skips it, takes round 1's
    assert list(rnd.state["ledger"]["spent"]) == [1.0]
    with pytest.raises(ValueError, match="cannot read"):
        restore_node_state(at(cfg, 3), "ledger", uncovered=False, strict=True, newest=True)


def test_a_client_next_sampled_after_a_lost_round_starts_from_a_finished_one(cfg) -> None:
    """Attempt A's round 6 is lost (the server died before its checkpoint); attempt B runs
    round 6 again without this client and samples it again in round 8: its start is round 5's
    state, not what it wrote in the lost attempt (found by an audit: it was round 6's)."""
    a, b = "aaaa:1", "aaaa:1,bbbb:6"
    keep(cfg, 5, 5.0, a)
    keep(cfg, 6, 6.0, a)  # lost with the server
    assert restored(cfg, 8, b) == 5.0
    assert restored(cfg, 8, b, newest=True) == 6.0  # a privacy ledger counts it all the same
    keep(cfg, 8, 8.0, b)
    assert restored(cfg, 9, b) == 8.0
    c = "aaaa:1,bbbb:6,cccc:8"  # B lost its round 8 in turn: back to A's round 5
    assert restored(cfg, 9, c) == 5.0, "round 8's save dropped the lost round 6, kept round 5"
    assert restored(cfg, 9, "zzzz:1") is None, "another run's files are not this run's state"
    assert restored(cfg, 9) == 8.0, "a server from before attempts were kept: the round rule"


def test_attempts_read_back_and_malformed_ones_are_none() -> None:
    assert decode_attempts(encode_attempts([("ab12", 1), ("cd34", 4)])) == [
        ("ab12", 1),
        ("cd34", 4),
    ]
    assert decode_attempts("") == [] and decode_attempts(None) == []
    assert decode_attempts("ab12:x") == [] and decode_attempts("ab12") == []
