"""Wire dtypes and top-k updates with error feedback."""

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedllm.aggregators import Factors, RoundSpec
from fedllm.constrained.compress import (
    RESIDUAL_KEY,
    decode_factors,
    decode_update,
    encode_factors,
    encode_update,
    topk_decode,
    topk_encode,
)
from fedllm.constrained.compression import Compression
from fedllm.features.types import ClientPlan, ClientRound, ClientUpdate
from fedllm.recipe import build_config


def factors(seed: int = 0) -> dict[str, Factors]:
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(256, 4, generator=g), torch.randn(4, 128, generator=g)
    return {"m": Factors(B, A, 2.0)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_halves_the_bytes_and_round_trips(dtype: str) -> None:
    f = factors()
    full, half = encode_factors(f, dtype="float32"), encode_factors(f, dtype=dtype)
    assert half.count_bytes() < 0.6 * full.count_bytes()
    back = decode_factors(half, scaling=2.0, dtype=dtype)["m"]
    assert back.B.dtype == torch.float32
    assert torch.allclose(back.B, f["m"].B, rtol=1e-2) and not torch.equal(back.B, f["m"].B)
    assert torch.equal(decode_factors(full, scaling=2.0)["m"].A, f["m"].A)
    with pytest.raises(ValueError, match="expected float32 on the wire"):
        decode_factors(half, scaling=2.0, dtype="float32")


def test_topk_sends_the_largest_entries_and_keeps_the_rest() -> None:
    delta = {"x": torch.tensor([[0.1, -5.0], [3.0, 0.2]])}
    record, residual = topk_encode(delta, fraction=0.5)
    dense = topk_decode(record, like=delta)["x"]
    assert torch.equal(dense, torch.tensor([[0.0, -5.0], [3.0, 0.0]]))
    assert torch.equal(residual["x"], torch.tensor([[0.1, 0.0], [0.0, 0.2]]))
    # next round the residual is added: 0.1 + 0.25 now beats 0.3
    record, residual = topk_encode(
        {"x": torch.tensor([[0.25, 0.0], [0.3, 0.0]])}, fraction=0.25, residual=residual
    )
    assert torch.allclose(topk_decode(record, like=delta)["x"], torch.tensor([[0.35, 0], [0, 0]]))


def test_error_feedback_loses_nothing_over_rounds() -> None:
    """Σ sent + final residual = Σ deltas exactly (fp32), even at 10 % of the entries."""
    g = torch.Generator().manual_seed(4)
    deltas = [{"x": torch.randn(100, 50, generator=g)} for _ in range(5)]
    residual, sent = None, torch.zeros(100, 50)
    for d in deltas:
        record, residual = topk_encode(d, fraction=0.1, residual=residual)
        assert record.count_bytes() < 0.25 * ArrayRecord(d).count_bytes()
        sent += topk_decode(record, like=d)["x"]
    assert torch.allclose(sent + residual["x"], sum(d["x"] for d in deltas), atol=1e-5)


def test_update_rebuilt_from_start_and_residual_kept_in_client_state() -> None:
    start, trained = factors(0), factors(1)
    state = RecordDict()
    record = encode_update(trained, start, dtype="float16", topk=1.0, state=state)
    back = decode_update(record, start, scaling=2.0, dtype="float16", topk=1.0)["m"]
    assert torch.allclose(back.B, trained["m"].B, atol=2e-3)
    assert "fedllm.topk-residual" in state
    dense = encode_update(trained, start, dtype="float32", topk=None, state=None)
    assert torch.equal(
        decode_update(dense, {}, scaling=2.0, dtype="float32", topk=None)["m"].A, trained["m"].A
    )


def test_malformed_topk_records_are_named() -> None:
    like = {"x": torch.zeros(2, 2)}
    bad = ArrayRecord({"x.idx": torch.tensor([0, 9], dtype=torch.int32), "x.val": torch.ones(2)})
    with pytest.raises(ValueError, match=r"x: top-k ids outside \[0, 4\)"):
        topk_decode(bad, like=like)
    with pytest.raises(ValueError, match="keys differ"):
        topk_decode(ArrayRecord({"y.idx": torch.tensor([0])}), like=like)
    with pytest.raises(ValueError, match="fraction"):
        topk_encode(like, fraction=0.0)


def topk_round(cfg, state: RecordDict, trained, start, *, server_round: int, node_config=None):
    """The compression feature's reply hook for client 1 in `server_round`: the encoded update."""
    plan = ClientPlan(1, 4, 0.0, None)
    config = ConfigRecord({"server-round": server_round})
    rnd = ClientRound(cfg, 1, server_round, RoundSpec(), config, node_config or {}, state, 0, plan)
    update = ClientUpdate(trained, start, 4)
    return Compression(cfg).reply({}, update, rnd=rnd)["update"].to_torch_state_dict()


def topk_recipe(tmp_path: Path, **privacy):
    return build_config(
        {
            "data": {"num_clients": 3},
            "lora": {"ranks": 4, "alpha": 8},
            "aggregator": {"name": "svd", "weighting": "uniform"},
            "compression": {"topk": 0.1},
            "privacy": privacy,
            "output_dir": str(tmp_path),
            "name": "r",
        }
    )


def test_a_resumed_node_takes_its_residual_back_from_its_own_folder(tmp_path: Path) -> None:
    """A resumed simulation's nodes are new processes with empty state: the top-k residual comes
    back from the file the client wrote, so the next reply is the one a live node would send."""
    cfg = topk_recipe(tmp_path)
    state = RecordDict()
    topk_round(cfg, state, factors(1), factors(0), server_round=1)
    written = tmp_path / "r" / "clients" / "1" / "node_state" / f"{RESIDUAL_KEY}.safetensors"
    assert written.is_file()
    residual = state[RESIDUAL_KEY].to_torch_state_dict()
    live = RecordDict({RESIDUAL_KEY: ArrayRecord(residual)})
    fresh = RecordDict()  # the same partition on a new node
    sent_fresh = topk_round(cfg, fresh, factors(3), factors(2), server_round=2)
    sent_live = topk_round(cfg, live, factors(3), factors(2), server_round=2)
    assert sent_fresh.keys() == sent_live.keys()
    assert all(torch.equal(sent_fresh[k], sent_live[k]) for k in sent_live)
    without = encode_update(factors(3), factors(2), dtype="float32", topk=0.1).to_torch_state_dict()
    assert not torch.equal(without["m.lora_B.val"], sent_live["m.lora_B.val"])
    assert torch.equal(
        fresh[RESIDUAL_KEY].to_torch_state_dict()["m.lora_B"],
        live[RESIDUAL_KEY].to_torch_state_dict()["m.lora_B"],
    )


def test_a_raw_updates_residual_stays_out_of_the_run_directory(tmp_path: Path) -> None:
    """Client-level DP noised by the server: the residual is part of the raw update, kept only
    in a node's own personal-dir."""
    cfg = topk_recipe(tmp_path, mode="client", client_noise_multiplier=1.0, delta=1e-3)
    topk_round(cfg, RecordDict(), factors(1), factors(0), server_round=1)
    assert not (tmp_path / "r").exists()
    mine = {"personal-dir": str(tmp_path / "org1")}
    topk_round(cfg, RecordDict(), factors(1), factors(0), server_round=1, node_config=mine)
    assert (tmp_path / "org1" / "node_state" / f"{RESIDUAL_KEY}.safetensors").is_file()
