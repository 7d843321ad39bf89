"""Emulated devices (speed, memory), the round deadline and what the bandit learns from a miss."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.server.superlink.linkstate.utils import (
    create_message_error_unavailable_ins_message,
    message_ttl_has_expired,
)
from transformers import LlamaConfig, LlamaForCausalLM

from fedllm.aggregators import RoundSpec
from fedllm.client.node_config import check_node
from fedllm.client.round import client_plan
from fedllm.constrained.adaptive import Adaptive
from fedllm.constrained.bandit import Arm, ArmBandit
from fedllm.constrained.devices import (
    MEMORY_REFUSAL,
    Device,
    Devices,
    activation_bytes,
    device_of,
    training_memory,
)
from fedllm.constrained.prune_map import Kept
from fedllm.constrained.pruned import PrunedBase
from fedllm.constrained.pruning import prune_model
from fedllm.data.shards import ProcessCache
from fedllm.deploy.device_grid import DeviceGrid
from fedllm.deploy.local_grid import server_identity
from fedllm.features import registry
from fedllm.features.types import ClientPlan, ClientRound, ClientRow, RoundResult, TrainReply
from fedllm.recipe import ConfigError, build_config, load_recipe
from fedllm.server.exchange import exchange
from fedllm.server.strategy import LoraStrategy

SHAPES = {"q": (6, 4), "v": (4, 4)}


def recipe(**extra) -> dict:
    return {"data": {"num_clients": 2}, "lora": {"ranks": 2, "alpha": 4}, **extra}


# -- profiles ------------------------------------------------------------------------------------
def test_a_node_runs_its_recipe_profile_with_its_own_keys_on_top() -> None:
    devices = [{"clients": 1, "slowdown": 3, "memory_mb": 100}, {"clients": 1, "threads": 1}]
    cfg = build_config(recipe(devices=devices))
    assert device_of(cfg, {"partition-id": 0}) == Device(None, 3.0, 100.0)
    assert device_of(cfg, {"partition-id": 1}) == Device(1, 1.0, None)
    assert device_of(cfg, {"partition-id": 1, "slowdown": "2.5", "memory-mb": 64}) == Device(
        1, 2.5, 64.0
    )
    assert device_of(build_config(recipe()), {"partition-id": 0}) is None  # no profile, no keys


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("slowdown", 0.5, r"slowdown=0.5: must be a number >= 1"),
        ("threads", 1.5, r"threads=1.5: must be a whole number"),
        ("memory-mb", "lots", r"memory-mb='lots': must be a number"),
        ("threads", True, r"threads=True"),
    ],
)
def test_a_malformed_device_key_is_named(key: str, value, match: str) -> None:
    cfg = build_config(recipe(devices=[{"clients": 2}]))
    with pytest.raises(ValueError, match=match):
        device_of(cfg, {"partition-id": 0, key: value})


def test_recipe_profiles_must_cover_the_clients_and_be_sane() -> None:
    with pytest.raises(ConfigError, match=r"devices cover 1 clients but data\.num_clients is 2"):
        build_config(recipe(devices=[{"clients": 1}]))
    with pytest.raises(ConfigError, match="slowdown"):
        build_config(recipe(devices=[{"clients": 2, "slowdown": 0.5}]))
    secagg = {"secure_aggregation": {"enabled": True}}
    three = {"num_clients": 3}
    with pytest.raises(ConfigError, match=r"drop devices or privacy\.secure_aggregation"):
        build_config(
            recipe(devices=[{"clients": 3}], privacy=secagg, data=three, aggregator={"name": "ffa"})
        )


def test_a_node_with_device_keys_needs_a_recipe_that_emulates_devices() -> None:
    with pytest.raises(ValueError, match=r"slowdown emulate a device.*`devices` section"):
        check_node(build_config(recipe()), {"partition-id": 0, "slowdown": 2})
    check_node(build_config(recipe(devices=[{"clients": 2}])), {"partition-id": 0, "slowdown": 2})


# -- speed ---------------------------------------------------------------------------------------
def slow_round(cfg, node_config: dict, *, seconds: float) -> tuple[RecordDict, float, list[int]]:
    """Devices.wrap_train around a 'round' that takes `seconds` of local steps."""
    seen = []

    def train(cfg, content, *, context):
        seen.append(torch.get_num_threads())
        time.sleep(seconds)
        return RecordDict({"metrics": MetricRecord({"train-seconds": seconds, "steps": 3})})

    context = SimpleNamespace(node_config=node_config)
    t0 = time.perf_counter()
    out = Devices.wrap_train(cfg, RecordDict(), context=context, train=train)
    return out, time.perf_counter() - t0, seen


def test_a_slow_device_sleeps_the_difference_under_its_thread_limit() -> None:
    cfg = build_config(recipe(devices=[{"clients": 2, "threads": 1, "slowdown": 3}]))
    before = torch.get_num_threads()
    out, elapsed, seen = slow_round(cfg, {"partition-id": 0}, seconds=0.1)
    assert seen == [1] and torch.get_num_threads() == before  # limited inside, restored after
    assert out["metrics"]["train-seconds"] == pytest.approx(0.3)  # the emulated device's time
    assert 0.29 <= elapsed < 1.5
    assert out["metrics"]["steps"] == 3


def test_a_device_that_cannot_make_the_deadline_stops_waiting_just_past_it() -> None:
    cfg = build_config(
        recipe(devices=[{"clients": 2, "slowdown": 1000}], federation={"round_timeout": 0.2})
    )
    out, elapsed, _ = slow_round(cfg, {"partition-id": 1}, seconds=0.05)
    assert 1.1 <= elapsed < 2.5  # 0.2 s deadline + 1 s margin, not 50 s
    assert out["metrics"]["train-seconds"] == pytest.approx(50.0)


def test_no_profile_leaves_the_message_to_the_plain_path() -> None:
    cfg = build_config(recipe(devices=[{"clients": 2, "memory_mb": 5}]))
    assert (
        Devices.wrap_train(cfg, RecordDict(), context=SimpleNamespace(node_config={}), train=None)
        is None
    )


# -- memory --------------------------------------------------------------------------------------
def test_activation_bytes_by_hand() -> None:
    dims = [(8, 2), (4, 1)]  # (MLP width, query heads) per layer
    kw = {"tokens": 6, "length": 3, "hidden": 4, "layer_dims": dims, "vocab": 10}
    # layer 1: 4·6·(6·4 + 4·8 + 2·2·3) = 1632; layer 2: 4·6·(24 + 16 + 6) = 1104; logits 4·6·10·2
    assert activation_bytes(**kw, checkpointing=False) == 1632 + 1104 + 480
    # checkpointing: each layer's input (4·6·4 per layer) + the largest layer + logits
    assert activation_bytes(**kw, checkpointing=True) == 2 * 96 + 1632 + 480


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def test_training_memory_of_a_small_llama_by_hand() -> None:
    model = tiny_llama()
    est = training_memory(
        model, rank=2, target_modules=["q_proj", "v_proj"], batch_size=2, length=5
    )
    # embed 32·8 + q 8·8 + k 4·8 + v 4·8 + o 8·8 + MLP 3·16·8 + 3 norms of 8 + lm_head 32·8,
    # fp32; plus two rotary buffers (inv_freq and original_inv_freq, head_dim/2 = 2 floats each)
    assert est.weights == 4 * (256 + 64 + 32 + 32 + 64 + 384 + 24 + 256) + 2 * 4 * 2
    # rank 2 on q (8×8) and v (4×8): weight, grad and AdamW's two moments, fp32
    assert est.adapter == 4 * 4 * 2 * ((8 + 8) + (4 + 8))
    # 10 tokens, one layer of MLP width 16 and 2 query heads; logits over 32
    assert est.activations == 4 * 10 * (6 * 8 + 4 * 16 + 2 * 2 * 5) + 4 * 10 * 32 * 2
    sgd = training_memory(
        model, rank=2, target_modules=["q_proj"], batch_size=2, length=5, optimizer="sgd"
    )
    assert sgd.adapter == 4 * 2 * 2 * (8 + 8)


def test_a_pruned_base_needs_less_and_the_estimate_sees_its_shapes() -> None:
    model = tiny_llama()
    pruned, _ = prune_model(model, 0.5, method="magnitude")
    kw = {"rank": 2, "target_modules": ["q_proj", "v_proj"], "batch_size": 2, "length": 5}
    full, half = training_memory(model, **kw), training_memory(pruned, **kw)
    assert half.weights < full.weights and half.adapter < full.adapter
    # MLP 16 -> 8 and query heads 2 -> 1
    assert half.activations == 4 * 10 * (6 * 8 + 4 * 8 + 2 * 1 * 5) + 4 * 10 * 32 * 2


def memory_round(cfg, partition: int, rank: int = 2) -> ClientRound:
    plan = ClientPlan(partition, rank, 0.0)
    node = {"partition-id": partition}
    return ClientRound(cfg, partition, 1, RoundSpec(), ConfigRecord({}), node, None, 0, plan)


def test_a_plan_that_does_not_fit_the_budget_is_refused_by_name() -> None:
    model = tiny_llama()
    kw = {"target_modules": ["q_proj", "v_proj"], "batch_size": 8, "length": 64}
    need = training_memory(model, rank=2, **kw).total / 2**20
    devices = [{"clients": 1, "memory_mb": need * 0.9}, {"clients": 1, "memory_mb": need * 1.1}]
    cfg = build_config(
        recipe(devices=devices, lora={"ranks": 2, "target_modules": kw["target_modules"]})
    )
    with pytest.raises(ValueError, match=rf"client 0: the plan \(rank 2.*{MEMORY_REFUSAL}"):
        Devices(cfg).prepare_base(model, memory_round(cfg, 0))
    assert Devices(cfg).prepare_base(model, memory_round(cfg, 1)) is model


# -- the deadline --------------------------------------------------------------------------------
class TimedLink:
    """A grid whose nodes answer after scripted delays, with the TTL rules of Flower's SuperLink:
    an expired message's reply is refused, and pulling it returns Flower's expiry error."""

    def __init__(self, delays: dict[int, float | str]) -> None:
        self.delays, self.pushed, self.sent = delays, {}, []

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            self.pushed[f"m{i}"] = (m, time.time())
            self.sent.append(m)
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids):
        out, now = [], time.time()
        for i in list(ids):
            m, at = self.pushed[i]
            delay = self.delays[m.metadata.dst_node_id]
            if delay == "offline":
                out.append(Message(Error(ErrorCode.NODE_UNAVAILABLE, "node gone"), reply_to=m))
            elif message_ttl_has_expired(m.metadata, now):
                out.append(create_message_error_unavailable_ins_message(i, 1))
            elif now >= at + delay:
                out.append(Message(RecordDict({"metrics": MetricRecord({"x": 1})}), reply_to=m))
        return out


def messages(nodes) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


def test_replies_after_the_deadline_are_missed_and_the_rest_go_on(capsys) -> None:
    with server_identity(1):
        link = TimedLink({1: 0.05, 2: 30.0, 3: "offline"})
        t0 = time.monotonic()
        replies = exchange(link, messages([1, 2, 3]), timeout=0.6, label="round 1 train")
        took = time.monotonic() - t0
    assert 0.6 <= took < 3.0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m2"]
    assert [r.has_error() for r in replies if r.metadata.reply_to_message_id == "m2"] == [True]
    # every message expires with the deadline, so the link drops stale work and late replies
    assert all(m.metadata.ttl <= 0.6 + 0.05 for m in link.sent)
    assert "1 of 3 clients missed the deadline (federation.round_timeout=0.6s; node 2)" in (
        capsys.readouterr().out
    )


def test_flowers_expiry_answer_counts_as_a_miss_not_a_failure(capsys) -> None:
    with server_identity(1):
        msgs = messages([1])
        msgs[0].metadata.ttl = 0.05  # expires long before the exchange's own deadline
        t0 = time.monotonic()
        assert exchange(TimedLink({1: 30.0}), msgs, timeout=20, label="x") == []
        assert time.monotonic() - t0 < 5  # Flower's expiry answer ends the wait
    assert "x: 1 of 1 clients missed the deadline (federation.round_timeout=20s; node 1)" in (
        capsys.readouterr().out
    )


class RefusingLink(TimedLink):
    """Flower's answer to a push refused as too large: no message ids at all."""

    def push_messages(self, messages):
        super().push_messages(messages)
        return []


def test_a_refused_push_is_missed_by_every_node_and_the_round_goes_on(capsys) -> None:
    with server_identity(1):
        assert (
            exchange(RefusingLink({4: 0.0, 7: 0.0}), messages([7, 4]), timeout=5, label="x") == []
        )
    assert "x: 2 of 2 clients missed the deadline (federation.round_timeout=5s; node 4, 7)" in (
        capsys.readouterr().out
    )


def device_app(seconds: dict[int, float]) -> ClientApp:
    """A ClientApp whose node of partition p takes seconds[p], and keeps one value in its cache
    (one slot: a node answered by another app's cache would find another node's value)."""
    app, cache = ClientApp(), ProcessCache()

    @app.train()
    def _train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        mine = cache.base.get(("node", pid), lambda: [pid, 0])
        mine[1] += 1  # how many messages this node answered with the same cached value
        time.sleep(seconds[pid])
        return Message(RecordDict({"metrics": MetricRecord({"seen": mine[1]})}), reply_to=msg)

    return app


def test_device_grid_times_each_node_as_if_they_worked_side_by_side(capsys) -> None:
    # one after another, node 1002 would answer 2.0 s after the push; side by side, 0.8 s (the
    # deadline, 1.8 s, leaves every node at least 0.6 s either side of it on a busy machine)
    grid = DeviceGrid([device_app({0: 1.2, 1: 0.8, 2: 2.4}) for _ in range(3)])
    with server_identity(grid.run.run_id):
        for rnd in (1, 2):
            msgs = messages([1001, 1002, 1003])
            replies = exchange(grid, msgs, timeout=1.8, label=f"round {rnd}")
            by_node = {r.metadata.src_node_id: r for r in replies}
            assert sorted(by_node) == [1001, 1002]  # partition 2 (2.4 s) misses both rounds
            # every node kept its own cached value across rounds although the others ran between
            assert {n: r.content["metrics"]["seen"] for n, r in by_node.items()} == {
                1001: rnd,
                1002: rnd,
            }
    assert capsys.readouterr().out.count("1 of 3 clients missed the deadline") == 2


# -- what the server learns ----------------------------------------------------------------------
def reply(rank: int, pruning: float, seconds: float) -> TrainReply:
    return TrainReply.parse(
        {
            "partition-id": 0,
            "rank": rank,
            "num-examples": 10,
            "train-loss": 1.7,
            "train-loss-first": 2.0,
            "train-loss-last": 1.5,
            "train-seconds": seconds,
            "steps": 1,
            "bytes-sent": 0,
            "bytes-received": 0,
            "pruning": pruning,
        }
    )


def test_the_bandit_scores_a_miss_zero_and_never_reoffers_an_arm_that_does_not_fit() -> None:
    adaptive = {"ranks": [1, 2], "pruning": [0.0, 0.5]}
    cfg = build_config(recipe(adaptive=adaptive, devices=[{"clients": 2}]))
    strategy = LoraStrategy(cfg, shapes=SHAPES, features=registry.build(cfg))
    devices, bandit = (
        next(f for f in strategy.features if isinstance(f, kind)) for kind in (Devices, Adaptive)
    )
    arms = {node: strategy.download(node)[1] for node in (3, 4, 5)}
    assert all((a["rank"], a["pruning"]) == (1, 0.0) for a in arms.values())  # UCB: arm 0 first
    refusal = f"ValueError: client 0: the plan (rank 1, pruning 0, full precision) {MEMORY_REFUSAL}"
    ok = ClientRow(1, 5, "ok", reply(1, 0.0, 2.0), 1)
    bandit.accepted(5, ok.reply)
    result = RoundResult(sampled=3, rows=[ClientRow(1, 3, "failed", reason=refusal), ok])
    server_row = {"round": 1}
    for f in strategy.features:  # node 4 sent nothing: it missed the deadline
        f.record(result, server_row=server_row)
    assert server_row["clients_missed"] == 1
    missed = [r.to_json() for r in result.rows if r.status == "missed"]
    assert missed == [
        {
            "kind": "client",
            "round": 1,
            "node": 4,
            "status": "missed",
            "reason": "no reply within the round's deadline (federation.round_timeout=3600s)",
            "arm_rank": 1,
            "arm_pruning": 0.0,
            "arm_quantization": "none",
            "arm_new_base": True,
        }
    ]
    b = bandit.bandit
    assert b.forbidden == {"3": [0]} and b.counts["3"] == [0, 0, 0, 0]
    assert b.counts["4"] == [0, 0, 0, 0]  # a miss on a freshly loaded base: replayed, not scored
    assert strategy.download(4)[1]["rank"] == 1
    bandit.record(RoundResult(1, []), server_row={})  # missed again, warm: now it scores 0
    assert b.counts["4"] == [1, 0, 0, 0] and b.sums["4"] == [0.0, 0.0, 0.0, 0.0]
    assert b.counts["5"] == [1, 0, 0, 0] and b.sums["5"][0] == pytest.approx(0.25 / 2.0)
    for _ in range(12):  # node 3 is never offered (1, 0.0) again, whatever it scores
        arm = strategy.download(3)[1]
        assert (arm["rank"], arm["pruning"]) != (1, 0.0)
        bandit.accepted(3, reply(arm["rank"], arm["pruning"], 1.0))
        bandit.record(RoundResult(1, [ClientRow(1, 3, "ok")]), server_row={})
    again = Adaptive(cfg)
    again.load_state_dict(bandit.state_dict())
    assert again.bandit.forbidden == {"3": [0]}
    assert devices.asked == [4] + [3] * 12


def test_a_node_the_bandit_moves_off_a_pruned_arm_gets_the_whole_factors() -> None:
    """The bandit's arm is set (`assign`) before a pruned base cuts a download to the kept ids
    of the node's last pruned reply: an unpruned arm gets full-shape factors (the first SmolLM2
    run of bench/constrained.py failed with 576 vs 384 rows when the order was the other way)."""
    adaptive = {"ranks": [1], "pruning": [0.0, 0.5]}
    cfg = build_config(recipe(adaptive=adaptive))
    strategy = LoraStrategy(cfg, shapes=SHAPES, features=registry.build(cfg))
    pruned, bandit = (
        next(f for f in strategy.features if isinstance(f, kind)) for kind in (PrunedBase, Adaptive)
    )
    # node 3's last reply: rank 1 on a base pruned to 0.5 that kept q's rows 0, 2, 4
    strategy.node_ranks[3] = 1
    pruned.known[3] = (0.5, {"q": Kept(torch.tensor([0, 2, 4]), None)})
    rows = {}
    for unplayable in (Arm(1, 0.5), Arm(1, 0.0)):
        bandit.bandit = ArmBandit([Arm(1, 0.0), Arm(1, 0.5)], algorithm="ucb", exploration=1.0)
        bandit.bandit.forbid("3", unplayable)
        record, config = strategy.download(3)
        tensors = record.to_torch_state_dict()
        rows[config["pruning"]] = (tensors["q.lora_B"].shape[0], tensors["v.lora_B"].shape[0])
    assert rows == {0.0: (6, 4), 0.5: (3, 4)}  # whole q at p0; q cut to rows 0, 2, 4 at p0.5


def test_a_miss_on_a_changed_base_is_replayed_warm_before_it_scores() -> None:
    """Stop 26: a miss scored 0 on every arm alike, so UCB cycled a slow device through its
    arms and each change of pruning or precision reloaded its base inside the round (0 of 24
    deadlines met). A miss on a new base is now asked again; a change of rank alone is warm."""
    adaptive = {"ranks": [1, 2], "pruning": [0.0, 0.5]}
    cfg = build_config(recipe(adaptive=adaptive))
    strategy = LoraStrategy(cfg, shapes=SHAPES, features=registry.build(cfg))
    bandit = next(f for f in strategy.features if isinstance(f, Adaptive))
    b = bandit.bandit

    def round_(*, met: bool) -> tuple[int, float]:
        config = strategy.download(7)[1]
        rows = []
        if met:
            bandit.accepted(7, reply(config["rank"], config["pruning"], 1.0))
            rows = [ClientRow(1, 7, "ok")]
        bandit.record(RoundResult(1, rows), server_row={})
        return config["rank"], config["pruning"]

    assert round_(met=False) == (1, 0.0)  # cold: not scored
    assert sum(b.counts["7"]) == 0 and bandit.replays == {7: Arm(1, 0.0)}
    assert round_(met=True) == (1, 0.0)  # the same arm again, warm
    assert b.counts["7"] == [1, 0, 0, 0] and bandit.replays == {}
    assert round_(met=False) == (1, 0.5)  # UCB's next arm prunes: a new base, replayed
    assert round_(met=False) == (1, 0.5)  # missed warm too: scored 0
    assert b.counts["7"] == [1, 1, 0, 0] and b.sums["7"][1] == 0.0
    assert round_(met=False) == (2, 0.0)  # back to the unpruned base: new again
    again = Adaptive(cfg)  # a resumed run keeps the pending replay and each node's base
    again.load_state_dict(bandit.state_dict())
    assert again.replays == {7: Arm(2, 0.0)} and again.bases == {7: (0.0, "none")}
    assert round_(met=False) == (2, 0.0)  # warm
    assert round_(met=False) == (2, 0.5)  # rank 2 pruned: a new base
    assert round_(met=False) == (2, 0.5)
    assert b.counts["7"] == [1, 1, 1, 1] and bandit.replays == {}
    assert bandit.bases == {7: (0.5, "none")}
    # a change of rank alone keeps the base: its miss scores 0 at once
    cfg = build_config(recipe(adaptive={"ranks": [1, 2], "pruning": [0.0]}))
    strategy = LoraStrategy(cfg, shapes=SHAPES, features=registry.build(cfg))
    bandit = next(f for f in strategy.features if isinstance(f, Adaptive))
    assert round_(met=False) == (1, 0.0) and round_(met=True) == (1, 0.0)  # cold, then warm
    assert round_(met=False) == (2, 0.0)  # same base, rank 2
    assert bandit.bandit.counts["7"] == [1, 1] and bandit.replays == {}


@pytest.mark.parametrize("algorithm,exploration", [("ucb", 1.0), ("exp3", 0.2)])
def test_a_forbidden_arm_is_never_selected(algorithm: str, exploration: float) -> None:
    arms = [Arm(r, p) for r in (2, 8) for p in (0.0, 0.5)]
    bandit = ArmBandit(arms, algorithm=algorithm, exploration=exploration, seed=3)
    bandit.forbid("d", Arm(2, 0.5))
    picks = set()
    for _ in range(60):
        arm = bandit.select("d")
        picks.add(arm)
        bandit.update("d", arm, reward=1.0 if arm == Arm(8, 0.5) else 0.1)
    assert Arm(2, 0.5) not in picks and bandit.best("d") == Arm(8, 0.5)
    if algorithm == "exp3":
        p = bandit.probabilities("d")
        assert p[1] == 0.0 and math.isclose(sum(p), 1.0)
    for arm in arms:  # nothing fits: every arm is offered again rather than none
        bandit.forbid("e", arm)
    assert bandit.allowed("e") == [0, 1, 2, 3]


def test_the_bandit_assigns_a_base_precision_and_the_client_runs_it() -> None:
    adaptive = {"ranks": [2], "pruning": [0.0], "quantization": ["4bit", "none"]}
    tiers = [{"name": "q", "rank": 2, "clients": 2, "quantization": "4bit"}]
    cfg = build_config(recipe(adaptive=adaptive, lora={"ranks": None, "tiers": tiers, "alpha": 4}))
    strategy = LoraStrategy(cfg, shapes=SHAPES, features=registry.build(cfg))
    bandit = next(f for f in strategy.features if isinstance(f, Adaptive))
    assert bandit.bandit.arms == [Arm(2, 0.0, "4bit"), Arm(2, 0.0, "none")]
    configs = []
    for _ in range(2):  # UCB plays each arm once: 4-bit, then full precision
        config = strategy.download(5)[1]
        configs.append(config)
        bandit.accepted(5, reply(2, 0.0, 1.0))
        bandit.record(RoundResult(1, [ClientRow(1, 5, "ok")]), server_row={})
    assert [c["quantization"] for c in configs] == ["4bit", "none"]
    plans = [client_plan(cfg, 0, config=dict(c), node_config={}) for c in configs]
    # the server's precision comes first, over the tier's 4-bit
    assert [p.quantization for p in plans] == ["4bit", None]
    assert (
        client_plan(cfg, 0, config={}, node_config={}).quantization == "4bit"
    )  # no assignment: the tier's
    with pytest.raises(ValueError, match=r"client 0: quantization must be one of .*'2bit'"):
        client_plan(cfg, 0, config={"quantization": "2bit"}, node_config={})


def test_an_old_checkpoint_of_rank_and_pruning_arms_loads_at_full_precision() -> None:
    bandit = ArmBandit([Arm(1, 0.0), Arm(1, 0.5)])
    state = bandit.state_dict()
    state["arms"] = [(1, 0.0), (1, 0.5)]  # before arms had a precision
    bandit.load_state_dict(state)
    assert bandit.arms == [Arm(1, 0.0, "none"), Arm(1, 0.5, "none")]
    with pytest.raises(ValueError, match="differ from the recipe"):
        ArmBandit([Arm(1, 0.0, "4bit"), Arm(1, 0.5)]).load_state_dict(state)


def test_an_old_checkpoint_without_forbidden_arms_loads() -> None:
    bandit = ArmBandit([Arm(1, 0.0)])
    state = bandit.state_dict()
    del state["forbidden"]
    bandit.load_state_dict(state)
    assert bandit.forbidden == {}


def test_a_round_whose_only_reply_in_time_is_an_error_goes_on(tmp_path, capsys) -> None:
    from fedllm.server.app import Run

    over = [f"output_dir={tmp_path}", "data.num_clients=2", "federation.round_timeout=0.5"]
    cfg = load_recipe(Path(__file__).parents[1] / "recipes" / "tiny.yaml", over)
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context) -> Message:
        if int(context.node_config["partition-id"]) == 0:
            raise ValueError("out of memory")
        time.sleep(0.8)  # past the deadline
        return Message(RecordDict(), reply_to=msg)

    grid = DeviceGrid([app, app])
    with server_identity(grid.run.run_id):
        result = Run(cfg, grid).train(1)  # before: "every client failed", the run stopped
    assert [(r.node, r.status) for r in result.rows] == [(1001, "failed")]
    assert (result.sampled, result.replies) == (2, 1)
    assert "1 of 2 clients missed the deadline" in capsys.readouterr().out


class ForgetfulLink(TimedLink):
    """Flower's in-memory grid: a message it cannot store is left out of the ids it returns."""

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        return [i for i, m in zip(ids, messages, strict=True) if m.metadata.dst_node_id != 3]


def test_a_message_the_grid_could_not_store_is_missed_and_the_others_answer(capsys) -> None:
    with server_identity(1):
        link = ForgetfulLink({1: 0.0, 2: 0.0, 3: 0.0})
        replies = exchange(link, messages([1, 2, 3]), timeout=5, label="x")
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert "x: 1 of 3 clients missed the deadline (federation.round_timeout=5s; node 3)" in (
        capsys.readouterr().out
    )


def test_a_node_that_misses_two_rounds_running_while_connected_is_named(capsys) -> None:
    """Slow, or a SuperNode stuck one reply behind after a run stopped mid-pull: the server
    says so (a node that left, or missed once, is not named)."""
    from types import SimpleNamespace

    from fedllm.server.app import Run

    run = SimpleNamespace(missed=set(), grid=SimpleNamespace(get_node_ids=lambda: [4, 5, 6]))
    Run.warn_repeat_misses(run, 1, {5, 7})
    Run.warn_repeat_misses(run, 2, {5, 6, 7})  # 7 missed twice but is gone
    Run.warn_repeat_misses(run, 3, {4})
    said = capsys.readouterr().out
    assert "round 2: node 5 missed the deadline two rounds running while connected" in said
    assert "restart it (docs/deployment.md, Failures)" in said
    assert said.count("missed the deadline two rounds running") == 1
