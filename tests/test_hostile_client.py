"""A hostile client against the server: each bad reply is rejected with a logged reason, the round
completes with the honest clients, and the global adapter stays finite.

Fast: every corruption through `LoraStrategy.train_round` beside three honest replies, for the
plain, DP-SGD and client-level-DP servers. Slow: a real federation (the round loop and ClientApp on
the in-process grid) in which one node's replies are corrupted a different way every round.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from test_strategy import SHAPES, factors, metrics, recipe, reply, strategy

from fedllm.aggregators import Aggregate, Factors, get
from fedllm.deploy.local_grid import LocalGrid, server_identity
from fedllm.features.base import Feature
from fedllm.model.adapters import to_record
from fedllm.model.packing import LAYOUT, is_packed, pack, unpack
from fedllm.privacy.accounting import partition_key

Corrupt = Callable[[RecordDict], RecordDict]


def _factors(content: RecordDict) -> dict[str, torch.Tensor]:
    return content["update"].to_torch_state_dict()


def _arrays(change: Callable[[dict[str, torch.Tensor]], None]) -> Corrupt:
    """A corruption of the reply's update arrays (a copy: the honest reply is not mutated)."""

    def corrupt(content: RecordDict) -> RecordDict:
        tensors = {k: v.clone() for k, v in _factors(content).items()}
        change(tensors)
        return RecordDict({**content, "update": ArrayRecord(tensors)})

    return corrupt


def _metrics(**values: object) -> Corrupt:
    def corrupt(content: RecordDict) -> RecordDict:
        old = dict(content["metrics"])
        new = {k: v for k, v in {**old, **values}.items() if v is not None}
        holder = (
            ConfigRecord if any(isinstance(v, str | bool) for v in new.values()) else MetricRecord
        )
        return RecordDict({**content, "metrics": holder(new)})

    return corrupt


def _first(key_end: str) -> Callable[[dict[str, torch.Tensor]], str]:
    return lambda t: next(k for k in sorted(t) if k.endswith(key_end))


def _set(key_end: str, value: float) -> Corrupt:
    def change(t: dict[str, torch.Tensor]) -> None:
        t[_first(key_end)(t)][0, 0] = value

    return _arrays(change)


def _reshape(t: dict[str, torch.Tensor]) -> None:
    key = _first(".lora_B")(t)
    t[key] = torch.zeros(t[key].shape[0] + 3, t[key].shape[1])


def _rank_up(t: dict[str, torch.Tensor]) -> None:  # factors of rank 3, metrics still say 2
    for key in list(t):
        x = t[key]
        t[key] = torch.cat([x, x[:, :1]], 1) if key.endswith("lora_B") else torch.cat([x, x[:1]])


def _drop_module(t: dict[str, torch.Tensor]) -> None:
    module = _first(".lora_A")(t).removesuffix(".lora_A")
    del t[module + ".lora_A"], t[module + ".lora_B"]


def _extra_module(t: dict[str, torch.Tensor]) -> None:
    t["k.lora_A"], t["k.lora_B"] = torch.ones(2, 4), torch.ones(4, 2)


def _dtype(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        for key in t:
            t[key] = t[key].to(dtype)

    return change


def _huge_norm(t: dict[str, torch.Tensor]) -> None:
    for key in t:
        if key.endswith("lora_B"):
            t[key] = t[key] * 1e6


def _gauge(t: dict[str, torch.Tensor]) -> None:
    """B·c with A/c: the same ΔW (its norm passes), but a factor-wise mean takes them apart."""
    for key in t:
        t[key] = t[key] * (1e4 if key.endswith("lora_B") else 1e-4)


def _oversized(t: dict[str, torch.Tensor]) -> None:
    t["q.lora_A"] = torch.zeros(2, 4)  # keep the update valid, then pad the message
    t["padding.lora_B"] = torch.zeros(2_000_000)


def _no_metrics(content: RecordDict) -> RecordDict:
    return RecordDict({"update": content["update"]})


def _no_update(content: RecordDict) -> RecordDict:
    return RecordDict({"metrics": content["metrics"]})


def _garbage_record(content: RecordDict) -> RecordDict:
    return RecordDict({**content, "update": ConfigRecord({"q.lora_A": "nonsense"})})


def _packed(change: Callable[[list], None]) -> Corrupt:
    """The reply packed as one array (fedllm.model.packing) with a layout `change` falsified."""

    def corrupt(content: RecordDict) -> RecordDict:
        packed = pack(content)
        layout = json.loads(packed[LAYOUT]["arrays"])
        change(layout)
        return RecordDict({**packed, LAYOUT: ConfigRecord({"arrays": json.dumps(layout)})})

    return corrupt


def _longer(layout: list) -> None:
    layout[0][5] += 8


def _clash(layout: list) -> None:
    for entry in layout:
        entry[0] = "metrics"


# name -> (corruption, words the rejection reason must contain)
HOSTILE: dict[str, tuple[Corrupt, str]] = {
    "NaN in B": (_set(".lora_B", float("nan")), "NaN or Inf"),
    "Inf in A": (_set(".lora_A", float("inf")), "NaN or Inf"),
    "-Inf in B": (_set(".lora_B", float("-inf")), "NaN or Inf"),
    "wrong shape": (_arrays(_reshape), "shape"),
    "factors of another rank": (_arrays(_rank_up), "claims rank"),
    "float64 factors": (_arrays(_dtype(torch.float64)), "dtype"),
    "integer factors": (_arrays(_dtype(torch.int32)), "dtype"),
    "missing module": (_arrays(_drop_module), "missing modules"),
    "extra module": (_arrays(_extra_module), "unknown modules"),
    "huge norm": (_arrays(_huge_norm), "median"),
    "B up, A down (same ΔW)": (_arrays(_gauge), "‖s·B‖"),
    "oversized message": (_arrays(_oversized), "bytes"),
    "huge weight": (_metrics(**{"num-examples": 10**12}), "num-examples"),
    "rank above the recipe": (_metrics(rank=64), "rank"),
    "garbage rank": (_metrics(rank="two"), "rank"),
    "bool rank": (_metrics(rank=True), "rank"),
    "NaN loss": (_metrics(**{"train-loss": float("nan")}), "train-loss"),
    "infinite steps": (_metrics(steps=float("inf")), "steps"),
    "negative steps": (_metrics(steps=-5), "steps"),
    "partition outside the recipe": (_metrics(**{"partition-id": 99}), "partition-id"),
    "missing partition": (_metrics(**{"partition-id": None}), "partition-id"),
    "no metrics record": (_no_metrics, "metrics"),
    "no update record": (_no_update, "update"),
    "update not an array record": (_garbage_record, "update"),
    "packed layout longer than its bytes": (_packed(_longer), "bytes"),
    "packed record over the metrics": (_packed(_clash), "clashes"),
}


def honest(node: int, partition: int) -> Message:
    return reply(node, factors(partition), metrics(partition))


def content_of(partition: int, **extra: object) -> RecordDict:
    values = {**metrics(partition), **extra}
    return RecordDict({"update": to_record(factors(partition)), "metrics": MetricRecord(values)})


def from_content(node: int, content: RecordDict) -> Message:
    from test_strategy import instruction

    return Message(content, reply_to=instruction(node))


@pytest.mark.parametrize("server", ["plain", "dp_sgd", "client_dp"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_reply_is_rejected_and_the_round_goes_on(
    name: str, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt, words = HOSTILE[name]
    privacy = {
        "plain": {},
        "dp_sgd": {"mode": "sample", "noise_multiplier": 1.0},
        "client_dp": {"mode": "client", "client_noise_multiplier": 1.0, "delta": 1e-3},
    }[server]
    weighting = "uniform" if server == "client_dp" else "examples"
    cfg = recipe(privacy=privacy, aggregator={"weighting": weighting}, data={"max_examples": 1000})
    dp = {"dp-noise-multiplier": 1.0, "dp-sample-rate": 0.1, "dp-steps": 5}
    extra = dp if server == "dp_sgd" else {}
    s = strategy(cfg)
    before = {m: f.delta() for m, f in s.global_.items()}
    replies = [from_content(1 + p, content_of(p, **extra)) for p in range(3)]
    replies.append(from_content(4, corrupt(content_of(3, **extra))))
    with caplog.at_level(logging.WARNING, logger="fedllm.server"):
        result = s.train_round(1, replies, sampled=4)
    rows = {r.node: r for r in result.rows}
    relative = ("huge norm", "B up, A down (same ΔW)")
    if name in relative and server == "client_dp":  # no relative screening: clipped to S
        assert rows[4].status == "ok"
        moved = sum(float((s.global_[m].delta() - before[m]).norm()) for m in before)
        assert moved < 10 * cfg.privacy.client_clip, "the hostile update was clipped to S"
        return
    # a private server reads only the keys its guarantee lets leave a client (h107): a bad
    # value in any other (a loss; the example count with uniform weights) is never read
    unread = {"NaN loss": ("dp_sgd", "client_dp"), "huge weight": ("client_dp",)}
    if server in unread.get(name, ()):
        assert rows[4].status == "ok" and rows[4].reply.train_loss is None
        assert rows[4].reply.num_examples is None or server == "dp_sgd"
        return
    assert rows[4].status == "rejected", f"{name}: {rows[4]}"
    assert words.lower() in rows[4].reason.lower(), rows[4].reason
    logged = [
        rec.getMessage()
        for rec in caplog.records
        if rec.levelno == logging.WARNING and rec.name.startswith("fedllm.server")
    ]
    reason = rows[4].reason
    lines = {  # screened, or unreadable (the row's reason is then "malformed reply: <error>")
        f"round 1: rejected node 4: {reason}",
        f"round 1: node 4 sent a {reason}",
    }
    assert lines & set(logged), f"the rejection is logged with its reason: {logged}"
    assert [rows[n].status for n in (1, 2, 3)] == ["ok"] * 3
    assert all(torch.isfinite(f.B).all() and torch.isfinite(f.A).all() for f in s.global_.values())
    assert any(not torch.equal(s.global_[m].delta(), before[m]) for m in before)


# -- evaluation replies ---------------------------------------------------------------------------


def eval_metrics(partition: int, *, loss: float = 2.0, tokens: int = 100) -> dict:
    held = {"held-out-loss": loss, "num-examples": 5}
    return {"partition-id": partition, "nll-sum": loss * tokens, "tokens": tokens, **held}


# name -> (metrics of node 4, which trained as partition 3; words its reason must contain)
HOSTILE_EVAL: dict[str, tuple[dict | None, str]] = {
    "NaN loss": ({**eval_metrics(3), "held-out-loss": math.nan}, "held-out-loss"),
    "Inf nll": ({**eval_metrics(3), "nll-sum": math.inf}, "nll-sum"),
    "a loss that is not its nll over its tokens": (eval_metrics(3) | {"nll-sum": 1.0}, "nll-sum"),
    "negative tokens": (eval_metrics(3) | {"tokens": -5, "nll-sum": -10.0}, "nll-sum"),
    "a huge token weight": (eval_metrics(3, loss=0.01, tokens=10**9), "tokens"),
    "string tokens": (eval_metrics(3) | {"tokens": "many"}, "tokens"),
    "partition outside the recipe": (eval_metrics(99), "partition-id"),
    "a partition it did not train as": (eval_metrics(1), "trained as 3"),
    "no partition": (
        {k: v for k, v in eval_metrics(3).items() if k != "partition-id"},
        "partition",
    ),
    "no metrics record": (None, "metrics"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_EVAL))
def test_a_hostile_evaluation_is_dropped_and_the_loss_is_the_others(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from fedllm.server.exchange import describe_evaluation

    values, words = HOSTILE_EVAL[name]
    s = strategy(recipe(data={"max_examples": 1000}))
    s.node_partitions = {1: 0, 2: 1, 3: 2, 4: 3}  # what their training replies taught
    honest = [
        reply(1 + p, None, eval_metrics(p, loss=1.0 + p, tokens=10 * (p + 1))) for p in range(3)
    ]
    bad = reply(4, None, values, record=ConfigRecord)
    with caplog.at_level(logging.WARNING, logger="fedllm.server"):
        loss, rows, dropped = s.evaluate_round(2, [*honest, bad])
    assert list(dropped) == [4] and words.lower() in dropped[4].lower(), dropped
    assert sorted(r.partition for r in rows) == [0, 1, 2]
    # by hand: (1·10 + 2·20 + 3·30) / 60 over the honest three
    assert loss == pytest.approx((140 / 60, 60))
    assert any("dropped node 4's evaluation" in r.getMessage() for r in caplog.records)
    assert describe_evaluation(bad, private=False).startswith(("sent malformed", "(partition"))


def test_two_nodes_claiming_one_partition_in_an_evaluation_are_both_dropped() -> None:
    s = strategy(recipe())
    replies = [reply(n, None, eval_metrics(p, tokens=10)) for n, p in ((1, 0), (2, 1), (3, 1))]
    loss, rows, dropped = s.evaluate_round(1, replies)  # no node has trained yet
    assert sorted(dropped) == [2, 3] and "claimed by nodes [2, 3]" in dropped[2]
    assert [r.partition for r in rows] == [0] and loss == pytest.approx((2.0, 10))


def test_a_newcomer_claiming_a_known_partition_loses_only_its_own_evaluation() -> None:
    """Dropping both would let any node without an accepted training reply silence an honest
    client's evaluation (and its vote under output.best_by: held_out_vote)."""
    s = strategy(recipe())
    s.node_partitions = {1: 0, 2: 1}  # what their training replies taught; node 3 never trained
    replies = [reply(n, None, eval_metrics(p, tokens=10)) for n, p in ((1, 0), (2, 1), (3, 1))]
    loss, rows, dropped = s.evaluate_round(2, replies)
    assert list(dropped) == [3] and "claimed by nodes [2, 3]" in dropped[3]
    assert sorted(r.partition for r in rows) == [0, 1] and loss == pytest.approx((2.0, 20))
    s.node_partitions = {1: 0, 2: 1, 3: 1}  # node 3 trained as 1 while node 2 was not sampled
    loss, rows, dropped = s.evaluate_round(3, replies)
    assert sorted(dropped) == [2, 3], "two known holders: neither can be told from the other"


def test_a_client_without_held_out_examples_has_no_row_not_a_loss_of_zero(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An honest client whose shard holds no held-out example replies 0 tokens (loss 0/1 = 0):
    its row would read held-out loss 0.0000 and perplexity 1.00 in the final table."""
    from fedllm.server.exchange import describe_evaluation

    s = strategy(recipe())
    empty = reply(3, None, eval_metrics(2, loss=0.0, tokens=0))
    replies = [reply(1, None, eval_metrics(0, loss=2.0, tokens=10)), empty]
    with caplog.at_level(logging.WARNING, logger="fedllm.server"):
        loss, rows, dropped = s.evaluate_round(1, replies)
    assert [r.partition for r in rows] == [0] and not dropped
    assert loss == pytest.approx((2.0, 10))
    assert any("partitions [2] hold no held-out examples" in r.getMessage() for r in caplog.records)
    assert describe_evaluation(empty, private=False) == "(partition 2): no held-out examples"
    assert describe_evaluation(empty, private=True) == "(partition 2)"  # h107: not which


class Counted(Feature):
    """A feature whose clients send two metrics: one declared (checked, written), one not."""

    name = "counted"
    reply_metrics = {"counted-steps": (int, 0), "counted-norm": float}  # noqa: RUF012


@pytest.mark.parametrize(
    ("extra", "status", "fields"),
    [
        (
            {"counted-steps": 4, "counted-norm": 0.5},
            "ok",
            {"counted_steps": 4, "counted_norm": 0.5},
        ),
        ({"counted-steps": 4, "undeclared": 7.0}, "ok", {"counted_steps": 4}),  # not written
        ({}, "ok", {}),  # absent: nothing
        ({"counted-steps": -1}, "rejected", {}),  # below its minimum
        ({"counted-norm": math.inf}, "rejected", {}),
        ({"counted-steps": 2.5}, "rejected", {}),  # not an int
    ],
)
def test_a_features_declared_reply_metrics_are_checked_and_written_to_the_row(
    extra: dict, status: str, fields: dict
) -> None:
    from fedllm.server.strategy import LoraStrategy

    cfg = recipe()
    s = LoraStrategy(cfg, shapes=SHAPES, features=[Counted(cfg)])
    honest_ones = [honest(n, n - 1) for n in (1, 2)]
    probe = reply(3, factors(2), {**metrics(2), **extra})
    result = s.train_round(1, [*honest_ones, probe], sampled=3)
    row = next(r for r in result.rows if r.node == 3)
    assert row.status == status, row.reason
    if status == "rejected":
        assert next(iter(extra)) in row.reason
    assert {k: v for k, v in row.to_json().items() if k.startswith(("counted", "undeclared"))} == (
        fields
    )


# -- a real federation with one hostile node ------------------------------------------------------


class HostileApp:
    """fedllm's ClientApp, except that node `hostile`'s training replies are corrupted, a
    different way each round, and its evaluations claim a billion tokens at loss 0.01 (messages
    go through Flower's serialisation both ways)."""

    def __init__(self, app, *, hostile: int, plan: list[str]) -> None:
        self.app, self.hostile, self.plan = app, hostile, plan
        self.rounds = 0

    def __call__(self, msg: Message, context: Context) -> Message:
        out = self.app(msg, context)
        if context.node_id != self.hostile:
            return out
        if msg.metadata.message_type == "evaluate":  # a token count that would own the mean
            content = unpack(out.content)
            metrics = dict(content["metrics"])
            tokens = 10**9
            metrics |= {"tokens": tokens, "nll-sum": 0.01 * tokens, "held-out-loss": 0.01}
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        if msg.metadata.message_type != "train":
            return out
        corrupt, _ = HOSTILE[self.plan[self.rounds % len(self.plan)]]
        self.rounds += 1
        was_packed = is_packed(out.content)  # the honest app's reply, its arrays packed as one
        bad = corrupt(unpack(out.content))
        return Message(pack(bad) if was_packed else bad, reply_to=msg)


@pytest.mark.slow
def test_a_hostile_node_in_a_real_federation_never_breaks_a_round(tmp_path: Path) -> None:
    from fedllm.client.app import make_client_app
    from fedllm.recipe import load_recipe
    from fedllm.server.app import run_server
    from fedllm.server.metrics import MetricsLog

    plan = ["NaN in B", "huge weight", "factors of another rank"]
    recipe_path = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
    overrides = [f"output_dir={tmp_path}", "name=hostile", "data.num_clients=4"]
    overrides += [
        "lora.ranks=[2,4,8,2]",
        f"federation.rounds={len(plan)}",
        "federation.local_steps=2",
    ]
    cfg = load_recipe(recipe_path, overrides)
    app = HostileApp(make_client_app(cfg), hostile=1004, plan=plan)
    grid = LocalGrid(app, cfg.data.num_clients)
    with server_identity(grid.run.run_id):
        run_dir = run_server(grid, cfg)
    rows = MetricsLog(run_dir).read()
    for rnd in range(1, len(plan) + 1):
        clients = {r["node"]: r for r in rows if r["kind"] == "client" and r["round"] == rnd}
        assert clients[1004]["status"] == "rejected", (rnd, plan[rnd - 1], clients[1004])
        words = HOSTILE[plan[rnd - 1]][1]
        assert words.lower() in clients[1004]["reason"].lower(), (rnd, clients[1004]["reason"])
        assert [clients[n]["status"] for n in (1001, 1002, 1003)] == ["ok"] * 3
    server = [r for r in rows if r["kind"] == "server"]
    assert len(server) == len(plan) + 1
    assert all(math.isfinite(r["held_out_loss"]) for r in server), "held-out loss finite"
    assert all(r["eval_dropped"] == 1 for r in server), "its evaluations are dropped"
    assert all(r["held_out_loss"] > 1.0 for r in server), "its 0.01 is not in the loss"
    assert server[-1]["held_out_loss"] < server[0]["held_out_loss"]


def test_an_unreadable_dp_sgd_reply_is_still_charged_to_its_nodes_partition() -> None:
    """A malformed reply reached the server, so under DP-SGD its node's partition is charged at
    the recipe's plan: the partitions the node may hold (round 1: the one no readable reply
    claimed), then the one it is known to hold."""
    cfg = recipe(privacy={"mode": "sample", "noise_multiplier": 1.0}, data={"max_examples": 1000})
    dp = {"dp-noise-multiplier": 1.0, "dp-sample-rate": 0.1, "dp-steps": 5}
    s = strategy(cfg)
    (feature,) = [f for f in s.features if f.name == "dp_sgd"]
    ledger = feature.account.ledger
    replies = [from_content(1 + p, content_of(p, **dp)) for p in range(3)]
    replies.append(from_content(4, _no_metrics(content_of(3, **dp))))
    result = s.train_round(1, replies, sampled=4)
    feature.record(result, server_row={})
    assert [ledger.steps(partition_key(p)) for p in range(3)] == [5, 5, 5]  # as reported
    *_, steps = feature._planned(3)  # the recipe's plan (σ, q, steps) for the unread partition
    assert ledger.steps(partition_key(3)) == steps > 0
    # round 2: node 4 is known (an honest reply taught it) and its partition is on the row
    s.train_round(2, [from_content(4, content_of(3, **dp))], sampled=1)
    before = ledger.steps(partition_key(3))
    result = s.train_round(3, [from_content(4, _no_metrics(content_of(3, **dp)))], sampled=1)
    feature.record(result, server_row={})
    (row,) = result.rows
    assert row.status == "rejected" and row.to_json()["partition"] == 3
    assert ledger.steps(partition_key(3)) == before + steps
    assert row.fields["epsilon"] == ledger.epsilon(partition_key(3)) > 0


# -- DP-SGD accounting numbers the plan of no shard could give ------------------------------------

HONEST_DP = {"dp-noise-multiplier": 1.0, "dp-sample-rate": 0.1, "dp-steps": 5}  # n = 8/0.1 = 80
DP_LIES: dict[str, tuple[dict[str, float], str]] = {
    "σ below the recipe's": ({"dp-noise-multiplier": 0.5}, "dp-noise-multiplier"),
    "q of no whole shard size": ({"dp-sample-rate": 0.0937}, "whole shard"),
    "q of a shard above max_examples": ({"dp-sample-rate": 8 / 5000}, "max_examples"),
    "q of a shard no bigger than a batch": ({"dp-sample-rate": 1.0}, "batch_size"),
    "steps above the plan": ({"dp-steps": 21}, "dp-steps"),
    "clip above the recipe's": ({"dp-max-grad-norm": 100.0}, "max_grad_norm"),
    "NaN σ": ({"dp-noise-multiplier": float("nan")}, "out of range"),
    "q of zero": ({"dp-sample-rate": 0.0}, "out of range"),
}


@pytest.mark.parametrize("name", sorted(DP_LIES))
def test_dp_sgd_numbers_no_plan_gives_are_rejected_and_charged_at_plan(name: str) -> None:
    """σ, q, steps and C must be the recipe's plan for some shard size it allows (q = batch/n,
    n ≤ data.max_examples and δ ≤ 0.1/n); a reply that lies is rejected and its partition
    charged at the recipe's plan, not at its numbers."""
    lie, words = DP_LIES[name]
    cfg = recipe(privacy={"mode": "sample", "noise_multiplier": 1.0}, data={"max_examples": 1000})
    s = strategy(cfg)
    (feature,) = [f for f in s.features if f.name == "dp_sgd"]
    replies = [from_content(1 + p, content_of(p, **HONEST_DP)) for p in range(3)]
    replies.append(from_content(4, content_of(3, **{**HONEST_DP, **lie})))
    result = s.train_round(1, replies, sampled=4)
    feature.record(result, server_row={})
    rows = {r.node: r for r in result.rows}
    assert [rows[n].status for n in (1, 2, 3)] == ["ok"] * 3
    assert rows[4].status == "rejected" and words in rows[4].reason, rows[4].reason
    ledger = feature.account.ledger
    assert [ledger.steps(partition_key(p)) for p in range(3)] == [5, 5, 5]
    sigma, q, steps = feature._planned(3)  # the recipe's split: not the lie
    assert ledger.steps(partition_key(3)) == steps == cfg.federation.local_steps
    assert sigma == 1.0 and q != lie.get("dp-sample-rate")


def test_under_a_target_epsilon_sigma_must_be_the_one_the_target_gives_at_q() -> None:
    """With `target_epsilon` σ depends on q: the σ of the plan for the q a reply reports is
    accepted, the (smaller) σ of a bigger shard's plan at that q is not."""
    from fedllm.privacy.plan import sample_plan

    cfg = recipe(privacy={"mode": "sample", "target_epsilon": 8.0}, data={"max_examples": 1000})
    small, big = (sample_plan(cfg, n_train=n) for n in (80, 800))
    assert big.noise_multiplier < small.noise_multiplier  # amplification by sampling
    s = strategy(cfg)
    honest_dp = {"dp-sample-rate": small.sample_rate, "dp-steps": small.steps_per_round}
    ok = {**honest_dp, "dp-noise-multiplier": small.noise_multiplier}
    lie = {**honest_dp, "dp-noise-multiplier": big.noise_multiplier}
    replies = [from_content(1, content_of(0, **ok)), from_content(2, content_of(1, **lie))]
    rows = {r.node: r for r in s.train_round(1, replies, sampled=2).rows}
    assert rows[1].status == "ok", rows[1].reason
    assert rows[2].status == "rejected" and "dp-noise-multiplier" in rows[2].reason


# -- partition ids: fixed per node, one node per partition in a round -----------------------------


def test_a_node_that_switches_partition_is_rejected() -> None:
    s = strategy(recipe())
    s.train_round(1, [honest(1 + p, p) for p in range(4)], sampled=4)
    replies = [honest(1, 0), honest(2, 1), honest(3, 2), honest(4, 2)]  # node 4 held 3
    rows = {r.node: r for r in s.train_round(2, replies, sampled=4).rows}
    assert [rows[n].status for n in (1, 2, 3)] == ["ok"] * 3
    assert rows[4].status == "rejected"
    assert "partition-id 2, but the node held 3 before" in rows[4].reason


def test_two_nodes_claiming_one_partition_in_a_round_are_both_rejected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Neither claim can be told from the other (a lie, or two SuperNodes started with the same
    partition-id): both are refused, logged, and the round goes on with the rest."""
    s = strategy(recipe())
    before = {m: f.delta() for m, f in s.global_.items()}
    with caplog.at_level(logging.WARNING, logger="fedllm.server"):
        result = s.train_round(1, [honest(1, 0), honest(2, 1), honest(3, 1)], sampled=3)
    rows = {r.node: r for r in result.rows}
    assert rows[1].status == "ok"
    for n in (2, 3):
        assert rows[n].status == "rejected" and rows[n].partition == 1
        assert rows[n].reason == "partition-id 1 claimed by nodes [2, 3] in one round"
        assert f"round 1: rejected node {n}: {rows[n].reason}" in caplog.text
    assert s.node_partitions == {1: 0}  # a rejected claim teaches the server nothing
    assert any(not torch.equal(s.global_[m].delta(), before[m]) for m in before)


# -- a feature's own reply metrics, and numbers a feature's later hooks compute from a reply ------


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("fedllm.server")
    ]


@pytest.mark.parametrize("tail", [[1.0], math.nan, math.inf, -1.0])
def test_a_hetlora_tail_that_is_no_finite_number_is_rejected_where_the_reply_is_read(
    tail: object, caplog: pytest.LogCaptureFixture
) -> None:
    """Flower's MetricRecord carries lists: `float([1.0])` in the feature's `record` (called
    after the round trained and evaluated, before its metrics and checkpoint) ended the run and
    lost the round. The reply is rejected in `receive`, naming the key; the round goes on."""
    s = strategy(recipe(aggregator={"name": "hetlora"}))
    replies = [from_content(1 + p, content_of(p, **{"hetlora-tail": 0.5 + p})) for p in range(2)]
    replies.append(from_content(3, content_of(2, **{"hetlora-tail": tail})))
    with caplog.at_level(logging.WARNING, logger="fedllm.server"):
        result = s.train_round(1, replies, sampled=3)
    server_row: dict = {"round": 1}
    for f in s.features:  # as the round loop does next: must not raise
        f.record(result, server_row=server_row)
    rows = {r.node: r for r in result.rows}
    assert rows[3].status == "rejected"
    assert "reply metric 'hetlora-tail'" in rows[3].reason, rows[3].reason
    assert f"round 1: node 3 sent a {rows[3].reason}" in _warnings(caplog)
    assert [rows[n].status for n in (1, 2)] == ["ok", "ok"]
    assert [rows[n].fields["hetlora_tail"] for n in (1, 2)] == [0.5, 1.5]
    assert [r.to_json()["hetlora_tail"] for r in result.ok] == [0.5, 1.5]
    assert s.node_partitions == {1: 0, 2: 1}


def test_hostile_losses_and_time_give_the_bandit_a_bounded_reward_not_a_crash() -> None:
    """adaptive (reward: client) learns from train-loss-first/last and train-seconds in its
    `accepted` hook, outside the per-reply error handling. First 1, last -1e308, 0 seconds made
    the efficiency (1 + 1e308) / 1e-6 = inf and the bandit raised, ending the run. The relative
    gain is now at most 1 (no cross-entropy is negative) over at least 1 µs: 1e6 at
    time_weight 1; the honest reply's (2 - 0.5) / 2 = 0.75 over 0.25 s is 3."""
    from fedllm.constrained.bandit import Arm

    s = strategy(recipe(adaptive={"ranks": [2]}))
    (feature,) = [f for f in s.features if f.name == "adaptive"]
    for node in (1, 2):
        s.download(node)  # each node is given its arm (rank 2, unpruned)
    lie = {"train-loss-first": 1.0, "train-loss-last": -1e308, "train-seconds": 0.0}
    replies = [from_content(1, content_of(0)), from_content(2, content_of(1, **lie))]
    result = s.train_round(1, replies, sampled=2)
    feature.record(result, server_row={"round": 1})
    assert [r.status for r in result.rows] == ["ok", "ok"]  # finite numbers: nothing to refuse
    arm = feature.bandit.arms.index(Arm(2, 0.0))
    assert feature.bandit.sums["1"][arm] == pytest.approx(3.0)
    assert feature.bandit.sums["2"][arm] == pytest.approx(1e6)
    assert feature.bandit.scales == pytest.approx({"1": 3.0, "2": 1e6})  # its own scale only
    assert all(math.isfinite(x) for sums in feature.bandit.sums.values() for x in sums)
    s.download(1)  # and the next round's choice still works


@pytest.mark.parametrize("aggregator", ["fedit", "squeeze"])
def test_with_two_replies_an_update_beyond_float32_is_rejected_alone(
    aggregator: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With fewer than three replies there is no median to screen against. A client claiming
    rank 1 (s = α/1 = 16) with B entries of 3e38 passed, and its s·B = 4.8e39 made the
    float32 aggregate inf for every later round. The absolute float32 bound rejects it alone;
    the global is the honest client's update on its own."""
    from test_strategy import GOOD, expected_global

    cfg = recipe(aggregator={"name": aggregator}, lora={"alpha": 16.0})
    s = strategy(cfg)
    hostile = {
        m: Factors(torch.full((d, 1), 3e38), torch.full((1, k), 0.5), 1.0)
        for m, (d, k) in SHAPES.items()
    }
    replies = [reply(1, GOOD[1], metrics(0)), reply(2, hostile, metrics(1, rank=1))]
    with caplog.at_level(logging.WARNING, logger="fedllm.server"):
        result = s.train_round(1, replies, sampled=2)
    rows = {r.node: r for r in result.rows}
    assert rows[1].status == "ok" and rows[2].status == "rejected"
    assert rows[2].reason == "q: s·B reaches 4.8e+39, beyond the factors' bound 1e+15"
    assert f"round 1: rejected node 2: {rows[2].reason}" in _warnings(caplog)
    want = expected_global(cfg, [GOOD[1]], [2], [10.0], server_round=1)
    for m, delta in want.items():
        torch.testing.assert_close(s.global_[m].delta(), delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregator", ["svd", "squeeze", "lorafair"])
def test_with_two_replies_lopsided_factors_are_rejected_alone(aggregator: str) -> None:
    """h105: B = 0 with A ≈ 1e37 has a zero update norm and passed, then overflowed the float32
    products of a randomized SVD (or made LoRA-FAIR's ridge solve singular) and the aggregator
    raised every round it was sampled, which ends a run after three. Each factor is bounded."""
    from test_strategy import GOOD

    cfg = recipe(aggregator={"name": aggregator})
    s = strategy(cfg)
    hostile = {
        m: Factors(torch.zeros(d, 2), torch.full((2, k), 1e37), 1.0) for m, (d, k) in SHAPES.items()
    }
    replies = [reply(1, GOOD[1], metrics(0)), reply(2, hostile, metrics(1))]
    result = s.train_round(1, replies, sampled=2)
    rows = {r.node: r for r in result.rows}
    assert result.aggregator_error is None and rows[1].status == "ok"
    assert rows[2].status == "rejected"
    assert rows[2].reason == "q: A reaches 1e+37, beyond the factors' bound 1e+15"


def _cross(b: float, a: float) -> dict[str, Factors]:
    return {
        m: Factors(torch.full((d, 2), b), torch.full((2, k), a), 1.0)
        for m, (d, k) in SHAPES.items()
    }


def test_an_aggregate_beyond_float32_is_refused_and_the_previous_global_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each update was within float32 (s·B = 2e37, ‖s·B·A‖ ≈ 2e8), but fedit averages the
    factors: B̄ ≈ 1e37 and Ā ≈ 5e36, so the global's ΔW was 1e74, no float32. Since stop 48 the
    factor bound (1e15) rejects each such update alone; the aggregate's own check stays for
    what no per-update bound catches (here an aggregator that returns such an aggregate):
    neither update can be blamed, the round is refused (both rows rejected with the reason,
    logged), the global stays, the next round goes on."""
    lopsided = strategy(recipe())
    pair = [reply(1, _cross(1e37, 1e-30), metrics(0)), reply(2, _cross(1e-30, 1e37), metrics(1))]
    rows = {r.node: r for r in lopsided.train_round(1, pair, sampled=2).rows}
    assert [rows[n].status for n in (1, 2)] == ["rejected", "rejected"]
    assert "beyond the factors' bound 1e+15" in rows[1].reason + rows[2].reason
    s = strategy(recipe())
    before = {m: (f.B.clone(), f.A.clone()) for m, f in s.global_.items()}

    def beyond(updates, weights, **kw):
        d, k = updates[0].shape
        return Aggregate(Factors(torch.full((d, 2), 1e37), torch.full((2, k), 1e37), 1.0))

    s.aggregate_fn = beyond
    with caplog.at_level(logging.WARNING, logger="fedllm.server"):
        result = s.train_round(1, [honest(1, 0), honest(2, 1)], sampled=2)
    s.aggregate_fn = get("fedit")
    rows = {r.node: r for r in result.rows}
    reason = rows[1].reason
    assert [rows[n].status for n in (1, 2)] == ["rejected", "rejected"]
    assert reason.startswith("aggregate refused (q: aggregate norm ‖s·B·A‖ = 9.8e+74, beyond")
    assert reason.endswith("): the global adapter is unchanged") and rows[2].reason == reason
    logged = _warnings(caplog)
    assert f"round 1: {reason}" in logged
    assert {f"round 1: rejected node {n}: {reason}" for n in (1, 2)} <= set(logged)
    assert all(
        torch.equal(s.global_[m].B, B) and torch.equal(s.global_[m].A, A)
        for m, (B, A) in before.items()
    )
    assert result.train_loss is None and not result.ok
    assert s.node_ranks == {} and s.node_partitions == {} and s.client_updates == {}
    assert [r.to_json()["partition"] for r in result.rows] == [0, 1]
    again = s.train_round(2, [honest(1, 0), honest(2, 1)], sampled=2)  # the run goes on
    assert [r.status for r in again.rows] == ["ok", "ok"]
    assert all(torch.isfinite(f.B).all() and torch.isfinite(f.A).all() for f in s.global_.values())


def test_a_feature_that_makes_the_aggregate_non_finite_is_undone() -> None:
    """The check runs again after the features' `after_aggregate`: a feature whose output is
    not finite gets the round refused, and its own state (e.g. server momentum's velocity) is
    put back as it was before the round."""
    from fedllm.features.base import Feature

    class Poison(Feature):
        name = "poison"

        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            self.steps = 0

        def after_aggregate(self, old, new, *, server_round):
            self.steps += 1
            return {m: Factors(f.B * math.inf, f.A, f.scaling) for m, f in new.items()}

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]

    cfg = recipe()
    s = strategy(cfg)
    poison = Poison(cfg)
    s.features.append(poison)
    before = {m: f.B.clone() for m, f in s.global_.items()}
    result = s.train_round(1, [honest(1, 0), honest(2, 1)], sampled=2)
    assert [r.status for r in result.rows] == ["rejected", "rejected"]
    assert result.rows[0].reason == (
        "aggregate refused (q: NaN or Inf in the aggregate after the features' "
        "after_aggregate): the global adapter is unchanged"
    )
    assert poison.steps == 0  # its state is the one before the round
    assert all(torch.equal(s.global_[m].B, B) for m, B in before.items())


def test_integers_past_2_53_are_refused_where_no_cap_bounds_them() -> None:
    # h93: without data.max_examples two replies with num-examples=1.7e308 overflowed the
    # aggregators' weight sums (OverflowError, the run ended); tokens=1.7e308 did so in the
    # evaluation's token-weighted mean
    s = strategy(recipe())
    assert s.cfg.data.max_examples is None
    replies = [from_content(1 + p, content_of(p)) for p in range(3)]
    replies += [from_content(4 + p, content_of(p, **{"num-examples": 1.7e308})) for p in (0, 1)]
    rows = {r.node: r for r in s.train_round(1, replies, sampled=5).rows}
    assert [rows[n].status for n in (4, 5)] == ["rejected"] * 2
    assert "must be at most 2**53" in rows[4].reason
    s.node_partitions = {1: 0, 2: 1, 3: 2, 4: 3}
    honest = [reply(1 + p, None, eval_metrics(p)) for p in range(3)]
    huge = reply(4, None, eval_metrics(3) | {"tokens": 1.7e308}, record=ConfigRecord)
    _, _, dropped = s.evaluate_round(2, [*honest, huge])
    assert "at most 2**53" in dropped[4]


def test_an_aggregator_that_fails_on_the_accepted_updates_refuses_the_round_not_the_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = strategy(recipe())
    before = dict(s.global_)

    def broken(*args: object, **kwargs: object) -> None:
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(s, "aggregate", broken)
    replies = [from_content(1 + p, content_of(p)) for p in range(3)]
    with caplog.at_level(logging.WARNING, logger="fedllm.server"):
        result = s.train_round(1, replies, sampled=3)
    assert [r.status for r in result.rows] == ["rejected"] * 3
    assert all("OverflowError" in r.reason for r in result.rows)
    assert s.global_ == before and s.node_ranks == {}  # a refused round teaches nothing
    assert "the aggregator failed" in caplog.text
