"""The bandit's reward (`adaptive.reward`): the clients' own losses, or the server's score of
each reply's adapter on the full base over its test set (`fedllm.constrained.adaptive`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from fedllm.aggregators.base import Factors
from fedllm.constrained.adaptive import Adaptive
from fedllm.constrained.bandit import Arm, efficiency
from fedllm.constrained.prune_map import Kept, expand, kept_to_record, restrict
from fedllm.data.shards import ProcessCache
from fedllm.features import registry
from fedllm.features.types import TrainReply
from fedllm.model.base import adapter_shapes, cached_base_model
from fedllm.recipe import ConfigError, load_recipe
from fedllm.server.app import Run
from fedllm.server.evaluation import TestSetEvaluator
from fedllm.server.strategy import LoraStrategy

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
TEST_SET = "data.test_set={fraction: 0.1, max_examples: 40}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("adaptive")
    cfg = load_recipe(
        RECIPE,
        [
            f"output_dir={out}",
            TEST_SET,
            "adaptive={ranks: [2, 4], reward: server, reward_examples: 8}",
        ],
    )
    return cfg, adapter_shapes(cfg)


def reply(*, rank: int, first: float, last: float, seconds: float) -> TrainReply:
    """A client's reply metrics claiming a first and last training loss."""
    return TrainReply.parse(
        MetricRecord(
            {
                "partition-id": 0,
                "rank": rank,
                "num-examples": 10,
                "train-loss": (first + last) / 2,
                "train-loss-first": first,
                "train-loss-last": last,
                "train-seconds": seconds,
                "steps": 1,
                "bytes-sent": 0,
                "bytes-received": 0,
            }
        )
    )


def test_a_server_reward_needs_the_server_test_set() -> None:
    with pytest.raises(ConfigError, match=r"adaptive\.reward=server .* data\.test_set is not set"):
        load_recipe(RECIPE, ["adaptive={ranks: [2], reward: server}"])
    with pytest.raises(ConfigError, match="reward"):
        load_recipe(RECIPE, [TEST_SET, "adaptive={ranks: [2], reward: servr}"])
    assert load_recipe(RECIPE, ["adaptive={ranks: [2]}"]).adaptive.reward == "client"


def test_the_scorer_takes_an_evenly_spaced_subset(tiny) -> None:
    cfg, _ = tiny
    whole = TestSetEvaluator(cfg).raw
    n = len(whole)
    assert n > 8
    assert TestSetEvaluator(cfg, max_examples=8).raw == [whole[i * n // 8] for i in range(8)]
    assert TestSetEvaluator(cfg, max_examples=n + 1).raw == whole


def test_the_server_scores_the_reply_not_the_claim(tiny) -> None:
    """A client claiming a gain but sending back its start scores 0; one whose adapter moved
    scores the gain the server measures from the start to its adapter, per second."""
    cfg, shapes = tiny
    strategy = LoraStrategy(cfg, shapes=shapes, features=registry.build(cfg))
    gen = torch.Generator().manual_seed(0)
    strategy.global_ = {  # a global adapter that is not the base model
        m: Factors(torch.randn(d, 4, generator=gen) * 0.2, torch.randn(4, k, generator=gen), 1.0)
        for m, (d, k) in shapes.items()
    }
    (bandit,) = [f for f in strategy.features if isinstance(f, Adaptive)]
    assert bandit.scorer is None  # built at the first score: a client's copy never loads data
    scorer = TestSetEvaluator(cfg, max_examples=8)  # an independent copy of the server's score

    _, extra = strategy.download(7)  # UCB plays every arm once, in order: rank 2 first
    assert extra["rank"] == 2
    s = cfg.client_scaling(2)
    start = {m: f.truncate(2, s) for m, f in strategy.global_.items()}
    claim = reply(rank=2, first=3.0, last=1.0, seconds=2.0)  # "I halved my loss"
    assert bandit.receive(7, RecordDict(), factors=start, reply=claim, shapes=shapes) is start
    bandit.accepted(7, claim)
    i = bandit.bandit.arms.index(Arm(2, 0.0))
    assert bandit.bandit.counts["7"][i] == 1
    assert bandit.bandit.sums["7"][i] == 0.0  # nothing changed on the full base

    _, extra = strategy.download(7)
    assert extra["rank"] == 4
    s = cfg.client_scaling(4)
    start = {m: f.truncate(4, s) for m, f in strategy.global_.items()}
    moved = {m: Factors(f.B * 0.5, f.A, f.scaling) for m, f in start.items()}
    first, last = scorer.evaluate(start)[0], scorer.evaluate(moved)[0]
    assert first != last
    claim = reply(rank=4, first=3.0, last=2.9, seconds=4.0)
    bandit.receive(7, RecordDict(), factors=moved, reply=claim, shapes=shapes)
    bandit.accepted(7, claim)
    j = bandit.bandit.arms.index(Arm(4, 0.0))
    expected = efficiency(first, last, seconds=4.0)
    assert bandit.bandit.sums["7"][j] == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(efficiency(3.0, 2.9, seconds=4.0))  # not the client's claim


def test_the_server_scores_on_the_base_its_run_already_holds(tiny) -> None:
    """reward=server used to build a cache of its own: a second copy of the base on the server."""
    cfg, _ = tiny
    cache = ProcessCache()
    run = Run(cfg, None, cache=cache)
    (bandit,) = [f for f in run.features if isinstance(f, Adaptive)]
    assert bandit.cache is cache
    held = cached_base_model(cfg, cache=cache)
    shapes = adapter_shapes(cfg, cache=cache).items()
    zero = {m: Factors(torch.zeros(d, 2), torch.zeros(2, k), 1.0) for m, (d, k) in shapes}
    bandit.score(zero)
    assert bandit.scorer.cache is cache
    assert cached_base_model(cfg, cache=cache)[0] is held[0]  # the same model object, not a copy


def test_the_client_reward_is_the_clients_own_losses(tiny) -> None:
    cfg, shapes = tiny
    client = load_recipe(
        RECIPE, [f"output_dir={cfg.output_dir}", "adaptive={ranks: [2, 4], time_weight: 0.5}"]
    )
    strategy = LoraStrategy(client, shapes=shapes, features=registry.build(client))
    (bandit,) = [f for f in strategy.features if isinstance(f, Adaptive)]
    assert bandit.scorer is None
    strategy.download(7)
    bandit.accepted(7, reply(rank=2, first=3.0, last=1.5, seconds=4.0))
    assert bandit.bandit.sums["7"][0] == pytest.approx(0.5 / 4.0**0.5)


def test_a_pruned_reply_is_scored_against_the_start_it_had(tiny) -> None:
    """h97: a pruned client's reply comes back with zeros at the ids it pruned, and was scored
    against the whole global cut to its rank, so one that trained nothing gained or lost by the
    rows it dropped. Its start now has the same zeros: sending it back scores no gain."""
    cfg, shapes = tiny
    pruned = load_recipe(
        RECIPE,
        [
            f"output_dir={cfg.output_dir}",
            TEST_SET,
            "adaptive={ranks: [2], pruning: [0.5], reward: server, reward_examples: 8}",
        ],
    )
    strategy = LoraStrategy(pruned, shapes=shapes, features=registry.build(pruned))
    gen = torch.Generator().manual_seed(1)
    strategy.global_ = {  # a poor global: zeroing half its rows helps
        m: Factors(torch.randn(d, 4, generator=gen) * 2.0, torch.randn(4, k, generator=gen), 1.0)
        for m, (d, k) in shapes.items()
    }
    (bandit,) = [f for f in strategy.features if isinstance(f, Adaptive)]
    _, extra = strategy.download(7)
    assert (extra["rank"], extra["pruning"]) == (2, 0.5)
    s = pruned.client_scaling(2)
    start = {m: f.truncate(2, s) for m, f in strategy.global_.items()}
    kept = {m: Kept(out=torch.arange(0, d, 2), in_=None) for m, (d, _) in shapes.items()}
    sent_back = {m: expand(restrict(f, kept[m]), kept[m], shape=f.shape) for m, f in start.items()}
    scorer = TestSetEvaluator(pruned, max_examples=8)
    assert scorer.evaluate(sent_back)[0] < scorer.evaluate(start)[0]  # the dropped rows "gain"
    content = RecordDict({"kept": kept_to_record(kept)})
    claim = reply(rank=2, first=3.0, last=1.0, seconds=2.0)
    bandit.receive(7, content, factors=sent_back, reply=claim, shapes=shapes)
    bandit.accepted(7, claim)
    assert bandit.bandit.counts["7"] == [1] and bandit.bandit.sums["7"] == [0.0]


def test_an_unpruned_arms_reply_is_scored_whole_whatever_map_it_sends(tiny) -> None:
    """h103: the map was read from any reply, and only a pruned arm's is checked (by the pruned
    base's feature, off when no arm prunes): an index out of range raised in `accepted`, which
    nothing catches, and ended the server. An unpruned arm's map is not read."""
    cfg, shapes = tiny
    strategy = LoraStrategy(cfg, shapes=shapes, features=registry.build(cfg))
    (bandit,) = [f for f in strategy.features if isinstance(f, Adaptive)]
    _, extra = strategy.download(7)
    assert (extra["rank"], extra["pruning"]) == (2, 0.0)
    s = cfg.client_scaling(2)
    start = {m: f.truncate(2, s) for m, f in strategy.global_.items()}
    bogus = {m: Kept(out=torch.tensor([10**6]), in_=None) for m in shapes}
    content = RecordDict({"kept": kept_to_record(bogus)})
    claim = reply(rank=2, first=3.0, last=1.0, seconds=2.0)
    bandit.receive(7, content, factors=start, reply=claim, shapes=shapes)
    bandit.accepted(7, claim)  # the start sent back: no gain, and no IndexError
    assert bandit.bandit.counts["7"][0] == 1 and bandit.bandit.sums["7"][0] == 0.0
