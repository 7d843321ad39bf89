"""Round checkpoints: weights-only loading, every saved value round-trips, atomic durable writes,
the previous checkpoint as a fallback, and clear errors for unreadable files."""

from __future__ import annotations

import builtins
import enum
import logging
import os
import random
import stat
from collections import OrderedDict, namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from fedllm.constrained.bandit import Arm, ArmBandit
from fedllm.privacy.accounting import PrivacyLedger
from fedllm.recipe import load_recipe
from fedllm.server import checkpoint as ckpt
from fedllm.server.checkpoint import (
    CHECKPOINT,
    CORRUPT,
    PREVIOUS,
    CheckpointError,
    has_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from fedllm.server.strategy import LoraStrategy

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
NODE_IDS = (2**63 + 12345, 7, 1)  # Flower node ids are unsigned 64-bit ints


class _Opens:
    """Unpickling this calls open(path, 'w'): stands in for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (builtins.open, (str(self.path), "w"))


def _real_state() -> dict:
    """A checkpoint as Run.save builds it: strategy state with int node ids, and feature states
    (bandit, both privacy accountants, server momentum, pruned-base maps)."""
    cfg = load_recipe(TINY)
    strategy = LoraStrategy(cfg, shapes={"layers.0.q_proj": (8, 6), "layers.0.v_proj": (8, 4)})
    strategy.node_ranks = {n: r for n, r in zip(NODE_IDS, (2, 4, 8), strict=True)}
    strategy.node_partitions = {n: p for p, n in enumerate(NODE_IDS)}
    strategy.agg_state = {"layers.0.q_proj": {"merged_B": torch.randn(8, 3)}}
    bandit = ArmBandit([Arm(2, 0.0), Arm(4, 0.5)], algorithm="exp3", exploration=0.5)
    bandit.update("partition-0", Arm(4, 0.5), reward=1.5)
    ledgers = {}
    for name in ("rdp", "prv"):
        ledger = PrivacyLedger(delta=1e-5, accountant=name)
        ledger.record("partition-0", noise_multiplier=1.1, sample_rate=0.05, steps=3)
        ledgers[name] = ledger
    return {
        "round": 3,
        "fingerprint": cfg.fingerprint(),
        "strategy": strategy.state_dict(),
        "adaptive": {"bandit": bandit.state_dict()},
        "privacy": {
            "ledger": ledgers["rdp"].state_dict(),
            "reported": {0: (1.1, 0.05, 3), 2: (0.9, 0.1, 4)},
        },
        "prv": {"ledger": ledgers["prv"].state_dict()},
        "server_momentum": {"velocity": {"q": {"B": torch.ones(8, 2), "A": torch.ones(2, 6)}}},
        "pruned": {"kept": {NODE_IDS[0]: (0.5, {"q": (torch.arange(4), None)})}},
        "flags": [True, False, None, float("inf"), -0.0, "text", b"bytes"],
        "bf16": torch.zeros(2, 2, dtype=torch.bfloat16),
    }


def _same(a: object, b: object) -> bool:
    """Deep equality that compares tensors by value and dtype and containers by exact type."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_every_value_a_run_saves_round_trips_under_weights_only(tmp_path: Path) -> None:
    state = _real_state()
    save_checkpoint(tmp_path, state)
    loaded = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert loaded.pop("digest") == ckpt.digest(loaded)  # the SHA-256 of the rest
    assert _same({**state, "rng": loaded["rng"]}, loaded)
    assert list(loaded["strategy"]["node_ranks"]) == list(NODE_IDS)  # int keys stay ints
    assert type(next(iter(loaded["pruned"]["kept"]))) is int
    back = load_checkpoint(tmp_path)
    assert back is not None and _same(back, loaded)
    fresh = LoraStrategy(load_recipe(TINY), shapes={"layers.0.q_proj": (8, 6)})
    fresh.load_state_dict(back["strategy"])
    assert fresh.node_ranks == {n: r for n, r in zip(NODE_IDS, (2, 4, 8), strict=True)}
    ledger = PrivacyLedger(delta=1e-5, accountant="prv")
    ledger.load_state_dict(back["prv"]["ledger"])
    assert ledger.steps("partition-0") == 3


def test_a_checkpoint_that_would_run_code_is_refused_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"round": 1, "evil": _Opens(marker)}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert not marker.exists(), "loading a checkpoint must not run code from it"
    message = str(err.value)
    assert str(tmp_path / CHECKPOINT) in message and "--overwrite" in message
    assert "refused" in message


def test_the_rng_states_are_restored(tmp_path: Path) -> None:
    torch.manual_seed(3)
    random.seed(3)
    save_checkpoint(tmp_path, {"round": 1})
    want = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    load_checkpoint(tmp_path)
    got = (torch.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and want[1] == got[1]


def test_values_weights_only_cannot_read_are_converted_at_save_time(tmp_path: Path) -> None:
    class Kind(str, enum.Enum):  # noqa: UP042 (the kind of value a checkpoint may hold)
        FAST = "fast"

    class Level(enum.IntEnum):
        HIGH = 2

    pair = namedtuple("pair", "a b")
    state = {
        "round": 1,
        "np_float": np.float64(0.25),
        "np_int": np.int64(7),
        "np_array": np.arange(3, dtype=np.float32),
        "param": torch.nn.Parameter(torch.ones(2)),
        "enums": [Kind.FAST, Level.HIGH],
        "named": pair(1, 2),
        "ordered": OrderedDict(b=1, a=2),
        "size": torch.Size([2, 3]),
    }
    save_checkpoint(tmp_path, state)
    got = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert type(got["np_float"]) is float and got["np_float"] == 0.25
    assert type(got["np_int"]) is int and got["np_int"] == 7
    assert torch.equal(got["np_array"], torch.arange(3, dtype=torch.float32))
    assert type(got["param"]) is torch.Tensor
    assert got["enums"] == ["fast", 2] and [type(x) for x in got["enums"]] == [str, int]
    assert type(got["named"]) is tuple and got["named"] == (1, 2)
    assert type(got["ordered"]) is OrderedDict and list(got["ordered"]) == ["b", "a"]
    assert got["size"] == torch.Size([2, 3])


def test_an_unsupported_value_is_named_and_the_old_checkpoint_kept(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"round": 1})
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(TypeError, match=r"state\['strategy'\]\['bad'\] is a .*Arm"):
        save_checkpoint(tmp_path, {"round": 2, "strategy": {"bad": Arm(2, 0.0)}})
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    assert not (tmp_path / f"{CHECKPOINT}.tmp").exists()


def test_each_save_keeps_the_one_before_and_leaves_no_temporary(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"round": 1})
    assert not (tmp_path / PREVIOUS).exists()
    save_checkpoint(tmp_path, {"round": 2})
    save_checkpoint(tmp_path, {"round": 3})
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["round"] == 3
    assert torch.load(tmp_path / PREVIOUS, weights_only=True)["round"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, PREVIOUS])


def test_a_save_fsyncs_the_file_and_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    save_checkpoint(tmp_path, {"round": 1})
    assert synced[0] == "file" and synced[-1] == "dir"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_an_unreadable_latest_falls_back_to_the_previous_with_a_warning(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    save_checkpoint(tmp_path, {"round": 1})
    save_checkpoint(tmp_path, {"round": 2})
    latest = tmp_path / CHECKPOINT
    data = latest.read_bytes()
    latest.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00" * 64}.get(damage, b"")
    )
    found = read_checkpoint(tmp_path)
    assert found is not None and found[1] == tmp_path / PREVIOUS  # no side effects yet
    assert latest.exists()
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        state = load_checkpoint(tmp_path)
    assert state is not None and state["round"] == 1
    assert str(latest) in caplog.text and "previous checkpoint" in caplog.text
    # the bad file is kept aside, so the next save does not make it the fallback
    assert not latest.exists() and (tmp_path / CORRUPT).exists()
    save_checkpoint(tmp_path, {"round": 2})
    assert torch.load(tmp_path / PREVIOUS, weights_only=True)["round"] == 1


def test_a_flipped_bit_in_a_tensor_falls_back_instead_of_loading(tmp_path: Path) -> None:
    # torch.load does not check the zip's CRCs: before the digest, h92's flipped bit loaded as
    # a valid round 3 with B[0, 0] = 9.1e37
    save_checkpoint(tmp_path, {"round": 1, "w": torch.full((64,), 0.25)})
    save_checkpoint(tmp_path, {"round": 2, "w": torch.full((64,), 0.25)})
    latest = tmp_path / CHECKPOINT
    data = bytearray(latest.read_bytes())
    at = data.index(torch.tensor([0.25] * 4).numpy().tobytes())
    data[at + 3] ^= 0x40
    latest.write_bytes(bytes(data))
    assert torch.load(latest, weights_only=True)["w"][0] != 0.25, "torch.load reads it"
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        ckpt._read(latest)
    state = load_checkpoint(tmp_path)
    assert state is not None and state["round"] == 1 and (tmp_path / CORRUPT).exists()
    assert "digest" not in state


def test_a_checkpoint_without_a_digest_still_reads(tmp_path: Path) -> None:
    # written before stop 44
    payload = {"round": 4, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    torch.save(payload, tmp_path / CHECKPOINT)
    assert load_checkpoint(tmp_path)["round"] == 4


def test_a_missing_latest_with_a_previous_copy_resumes_from_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_checkpoint(tmp_path, {"round": 1})
    save_checkpoint(tmp_path, {"round": 2})
    (tmp_path / CHECKPOINT).unlink()
    assert has_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        assert load_checkpoint(tmp_path)["round"] == 1
    assert "previous checkpoint" in caplog.text


def test_a_pending_round_is_in_the_fallback_copy_too(tmp_path: Path) -> None:
    """Run.save marks a round pending before its clients train (a resume charges it to the DP
    ledgers); a resume from the fallback must charge it as well, not drop it."""
    from types import SimpleNamespace

    from fedllm.server.app import Run

    cfg = load_recipe(TINY, [f"output_dir={tmp_path}", "name=r"])
    cfg.run_dir.mkdir(parents=True)
    run = SimpleNamespace(cfg=cfg, features=[], strategy=SimpleNamespace(state_dict=dict))
    Run.save(run, 1)  # round 1 finished
    pending = {"round": 2, "partitions": [0, 1], "sampled": 2}
    Run.save(run, 1, pending=pending)  # round 2's clients are asked to train
    for path in (cfg.run_dir / CHECKPOINT, cfg.run_dir / PREVIOUS):
        state = torch.load(path, weights_only=True)
        assert (state["round"], state["pending"]) == (1, pending), path.name
    (cfg.run_dir / CHECKPOINT).write_bytes(b"\x00" * 64)  # the latest lost: the fallback charges
    assert load_checkpoint(cfg.run_dir)["pending"] == pending
    Run.save(run, 1, pending=pending)  # (resumed) round 2 asked again
    Run.save(run, 2)  # and finished: the fallback is the pending copy, as before
    assert torch.load(cfg.run_dir / CHECKPOINT, weights_only=True)["pending"] is None
    assert torch.load(cfg.run_dir / PREVIOUS, weights_only=True)["pending"] == pending
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == sorted([CHECKPOINT, CORRUPT, PREVIOUS])


def test_a_truncated_checkpoint_without_fallback_is_a_clear_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"round": 1})
    latest = tmp_path / CHECKPOINT
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    assert str(latest) in message and "--overwrite" in message
    assert f"no {PREVIOUS}" in message


def test_both_checkpoints_unreadable_names_both(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT).write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / PREVIOUS).write_text("hello")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    assert str(tmp_path / CHECKPOINT) in message and str(tmp_path / PREVIOUS) in message
    assert "--overwrite" in message


def test_a_readable_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"round": 1}, tmp_path / CHECKPOINT)  # no RNG states: not written by fedllm
    with pytest.raises(CheckpointError, match="not a fedllm checkpoint"):
        load_checkpoint(tmp_path)


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert not has_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path) is None and read_checkpoint(tmp_path) is None


def test_plain_is_the_identity_on_plain_data() -> None:
    state = _real_state()
    assert _same(ckpt.plain(state), state)
