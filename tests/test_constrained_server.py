"""Server side of constrained clients: restricted downloads, top-k replies from pruned clients."""

import torch
from flwr.app import MetricRecord, RecordDict

from fedllm.aggregators import Factors, RoundSpec
from fedllm.compress import decode_factors, flat
from fedllm.config import build_config
from fedllm.constrained_client import build_reply
from fedllm.constrained_server import ConstrainedClients
from fedllm.prune_map import Kept, fit_start

SHAPES = {"q": (6, 4), "v": (4, 4)}


def cfg(**compression):
    return build_config(
        {
            "data": {"num_clients": 2},
            "lora": {"ranks": 2, "alpha": 4},
            "compression": compression,
            "aggregator": {"name": "svd"},
        }
    )


def global_factors() -> dict[str, Factors]:
    g = torch.Generator().manual_seed(0)
    return {
        m: Factors(torch.randn(d, 3, generator=g), torch.randn(3, k, generator=g), 1.0)
        for m, (d, k) in SHAPES.items()
    }


def test_pruned_client_topk_round_trip_lands_at_kept_rows() -> None:
    c = cfg(dtype="bfloat16", topk=0.5)
    server = ConstrainedClients(c)
    kept = {"q": Kept(out=torch.tensor([0, 2, 5]), in_=None)}
    g = global_factors()
    # round 1: node unknown -> full global; the client restricts it itself
    record, extra = server.download(7, g, rank=None)
    assert extra == {}
    received = decode_factors(record, scaling=1.0, dtype="bfloat16")
    start = fit_start(received, kept, rank=2, scaling=c.client_scaling(2))
    assert start["q"].shape == (3, 4)
    trained = {m: Factors(f.B + 0.5, f.A - 0.25, f.scaling) for m, f in start.items()}
    state = RecordDict()
    records = build_reply(c, trained, spec=RoundSpec(), start=start, kept=kept, state=state)
    content = RecordDict({**records, "metrics": MetricRecord({"rank": 2})})
    full = server.receive(7, content, rank=2, pruning=0.5, shapes=SHAPES)
    assert full["q"].shape == (6, 4) and full["v"].shape == (4, 4)
    assert torch.count_nonzero(full["q"].B[[1, 3, 4]]) == 0
    # what arrived + what the client kept back = what it trained, at the kept rows
    residual = state["fedllm.topk-residual"].to_torch_state_dict()
    rebuilt = full["q"].B[[0, 2, 5]] + residual["q.lora_B"]
    assert torch.allclose(rebuilt, trained["q"].B, atol=1e-6)
    # round 2: the server now sends the node only its kept rows, at its rank
    record, _ = server.download(7, g, rank=2)
    again = decode_factors(record, scaling=c.client_scaling(2), dtype="bfloat16")
    assert again["q"].shape == (3, 4) and again["q"].rank == 2

    def numel(r):
        return sum(t.numel() for t in r.to_torch_state_dict().values())

    assert numel(record) == 3 * 2 + 2 * 4 + 4 * 2 + 2 * 4  # vs 6·3 + 3·4 + 4·3 + 3·4 in full
    assert set(flat(again)) == {"q.lora_A", "q.lora_B", "v.lora_A", "v.lora_B"}


def test_bandit_assigns_arms_learns_and_checkpoints() -> None:
    c = build_config(
        {
            "data": {"num_clients": 2},
            "lora": {"ranks": 2},
            "adaptive": {"ranks": [1, 2], "pruning": [0.0, 0.5], "time_weight": 1.0},
        }
    )
    server = ConstrainedClients(c)
    assert server.max_rank() == 2
    g = global_factors()
    seen = []
    for _ in range(4):  # UCB plays every arm once, in order
        record, extra = server.download(3, g, rank=None)
        seen.append((extra["rank"], extra["pruning"]))
        assert {f.rank for f in decode_factors(record, scaling=1.0).values()} == {extra["rank"]}
        fast = extra["pruning"] == 0.5
        server.observe(
            3,
            {
                "train-loss-first": 2.0,
                "train-loss-last": 1.5,
                "train-seconds": 1.0 if fast else 4.0,
            },
        )
    assert seen == [(1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)]
    assert server.bandit.best("3").pruning == 0.5
    again = ConstrainedClients(c)
    again.load_state_dict(server.state_dict())
    assert again.bandit.counts == server.bandit.counts
