"""Server side of constrained clients: restricted downloads, top-k replies from pruned clients."""

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedllm.aggregators import Factors, RoundSpec
from fedllm.constrained.adaptive import Adaptive
from fedllm.constrained.compress import decode_factors, flat
from fedllm.constrained.prune_map import Kept, fit_start, kept_to_record
from fedllm.constrained.pruned import PrunedBase
from fedllm.features import registry
from fedllm.features.types import ClientPlan, ClientRound, ClientUpdate, TrainReply
from fedllm.model import wire
from fedllm.recipe import build_config
from fedllm.server.strategy import LoraStrategy

SHAPES = {"q_proj": (6, 4), "v_proj": (4, 4)}


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's relative output_dir (where a top-k client writes its residual) in tmp_path."""
    monkeypatch.chdir(tmp_path)


def cfg(**compression):
    tiers = [{"name": "pruned", "rank": 2, "clients": 2, "pruning": 0.5}]
    return build_config(
        {
            "data": {"num_clients": 2},
            "lora": {"ranks": None, "tiers": tiers, "alpha": 4},
            "compression": compression,
            "aggregator": {"name": "svd"},
        }
    )


def server(c) -> LoraStrategy:
    """A strategy with the recipe's features whose global adapter is `global_factors()`."""
    strategy = LoraStrategy(c, shapes=SHAPES, features=registry.build(c))
    strategy.global_ = global_factors()
    return strategy


def build_reply(c, trained, *, start, kept, state) -> dict:
    """What a pruned client sends: the features' reply hooks on its trained factors."""
    plan = ClientPlan(0, 2, 0.5)
    rnd = ClientRound(c, 0, 1, RoundSpec(), ConfigRecord({}), {}, state, 0, plan)
    features = registry.build(c)
    for f in features:
        if isinstance(f, PrunedBase):
            f.kept = kept  # what its prepare_base would have found
    arrays = {"update": wire.outgoing(trained, RoundSpec())}
    for f in features:
        arrays = f.reply(arrays, ClientUpdate(dict(trained), dict(start), 2), rnd=rnd)
    return arrays


def reply_metrics(*, rank: int, pruning: float = 0.0, **loss) -> MetricRecord:
    values = {"train-loss-first": 2.0, "train-loss-last": 1.5, "train-seconds": 1.0, **loss}
    return MetricRecord(
        {
            "partition-id": 0,
            "rank": rank,
            "num-examples": 10,
            "train-loss": 1.7,
            "steps": 1,
            "bytes-sent": 0,
            "bytes-received": 0,
            "pruning": pruning,
            **values,
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
    strategy = server(c)
    kept = {"q_proj": Kept(out=torch.tensor([0, 2, 5]), in_=None)}
    # round 1: node unknown -> full global; the client restricts it itself
    record, extra = strategy.download(7)
    assert extra == {}
    received = decode_factors(record, scaling=1.0, dtype="bfloat16")
    start = fit_start(received, kept, rank=2, scaling=c.client_scaling(2))
    assert start["q_proj"].shape == (3, 4)
    trained = {m: Factors(f.B + 0.5, f.A - 0.25, f.scaling) for m, f in start.items()}
    state = RecordDict()
    records = build_reply(c, trained, start=start, kept=kept, state=state)
    content = RecordDict({**records, "metrics": reply_metrics(rank=2, pruning=0.5)})
    reply, full = strategy.read_reply(7, content)
    strategy.remember(7, reply)
    assert full["q_proj"].shape == (6, 4) and full["v_proj"].shape == (4, 4)
    assert torch.count_nonzero(full["q_proj"].B[[1, 3, 4]]) == 0
    # what arrived + what the client kept back = what it trained, at the kept rows
    residual = state["fedllm.topk-residual"].to_torch_state_dict()
    rebuilt = full["q_proj"].B[[0, 2, 5]] + residual["q_proj.lora_B"]
    assert torch.allclose(rebuilt, trained["q_proj"].B, atol=1e-6)
    # round 2: the server now sends the node only its kept rows, at its rank
    record, _ = strategy.download(7)
    again = decode_factors(record, scaling=c.client_scaling(2), dtype="bfloat16")
    assert again["q_proj"].shape == (3, 4) and again["q_proj"].rank == 2

    def numel(r):
        return sum(t.numel() for t in r.to_torch_state_dict().values())

    assert numel(record) == 3 * 2 + 2 * 4 + 4 * 2 + 2 * 4  # vs 6·3 + 3·4 + 4·3 + 3·4 in full
    assert set(flat(again)) == {"q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"}


def test_bandit_assigns_arms_learns_and_checkpoints() -> None:
    c = build_config(
        {
            "data": {"num_clients": 2},
            "lora": {"ranks": 2},
            "adaptive": {"ranks": [1, 2], "pruning": [0.0, 0.5], "time_weight": 1.0},
        }
    )
    strategy = server(c)
    (bandit,) = [f for f in strategy.features if isinstance(f, Adaptive)]
    assert c.max_rank == 2
    seen = []
    for _ in range(4):  # UCB plays every arm once, in order
        record, extra = strategy.download(3)
        seen.append((extra["rank"], extra["pruning"]))
        assert {f.rank for f in decode_factors(record, scaling=1.0).values()} == {extra["rank"]}
        fast = extra["pruning"] == 0.5
        bandit.accepted(
            3,
            TrainReply.parse(
                reply_metrics(
                    rank=extra["rank"],
                    **{
                        "train-loss-first": 2.0,
                        "train-loss-last": 1.5,
                        "train-seconds": 1.0 if fast else 4.0,
                    },
                )
            ),
        )
    assert seen == [(1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)]
    assert bandit.bandit.best("3").pruning == 0.5
    again = Adaptive(c)
    again.load_state_dict(bandit.state_dict())
    assert again.bandit.counts == bandit.bandit.counts


@pytest.mark.parametrize(
    "kept",
    [
        {"q_proj": Kept(out=torch.tensor([0, 2, 5]), in_=torch.tensor([0, 1, 2, 3]))},
        {"v_proj": Kept(out=torch.tensor([0, 1, 2, 3]), in_=None)},  # v_proj is never pruned
    ],
    ids=["both sides", "an unpruned module"],
)
def test_a_kept_map_on_a_side_pruning_never_cuts_is_rejected(kept) -> None:
    """h104: such a map passed every check, and the coverage weights raised after screening,
    which nothing caught: the run ended, and every resume with it."""
    c = cfg()
    strategy = server(c)
    trained = {}  # sized to fit the map, as check_kept wants
    for m, (d, k) in SHAPES.items():
        one = kept.get(m, Kept(None, None))
        rows, cols = d if one.out is None else len(one.out), k if one.in_ is None else len(one.in_)
        trained[m] = Factors(torch.ones(rows, 2), torch.ones(2, cols), c.client_scaling(2))
    content = RecordDict(
        {
            "update": wire.outgoing(trained, RoundSpec()),
            "kept": kept_to_record(kept),
            "metrics": reply_metrics(rank=2, pruning=0.5),
        }
    )
    with pytest.raises(ValueError, match=r"kept-index map on (q|v)_proj\.(out/in|out); pruning"):
        strategy.read_reply(7, content)
