"""`LoraStrategy` without a federation: hand-made Flower replies through `train_round`, the
download cut, sampling, and the metrics.jsonl rows (small shapes, fedit aggregation by hand)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

import fedllm.aggregators
from fedllm.aggregators import Factors
from fedllm.deploy.local_grid import server_identity, wire
from fedllm.features import registry
from fedllm.features.types import ROW_KEYS, ClientRow, RoundResult, TrainReply
from fedllm.model.adapters import from_record, to_record
from fedllm.recipe import RunConfig, build_config
from fedllm.server.strategy import LoraStrategy

SHAPES = {"q": (6, 4), "v": (4, 4)}
ALPHA = 4.0


def recipe(**sections: dict[str, Any]) -> RunConfig:
    """4 clients of rank 2, α = 4 (client scaling 2), fedit; `sections` update a section."""
    data: dict[str, Any] = {
        "data": {"num_clients": 4},
        "lora": {"ranks": 2, "alpha": ALPHA},
        "aggregator": {"name": "fedit"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return build_config(data)


def strategy(cfg: RunConfig) -> LoraStrategy:
    return LoraStrategy(cfg, shapes=SHAPES, features=registry.build(cfg))


def factors(seed: int, *, rank: int = 2, scale: float = 1.0) -> dict[str, Factors]:
    """A client's float32 factors at the global shapes with entries of size ~`scale`.

    The scaling is a placeholder: the strategy re-derives α/r from the claimed rank."""
    g = torch.Generator().manual_seed(seed)
    return {
        m: Factors(
            torch.randn(d, rank, generator=g) * scale, torch.randn(rank, k, generator=g), 1.0
        )
        for m, (d, k) in SHAPES.items()
    }


def metrics(partition: int, *, rank: int = 2, examples: int = 10, loss: float = 1.0) -> dict:
    return {
        "partition-id": partition,
        "rank": rank,
        "num-examples": examples,
        "train-loss": loss,
        "train-loss-first": loss + 1.0,
        "train-loss-last": loss - 0.5,
        "steps": 5,
        "train-seconds": 0.25,
        "bytes-sent": 1000,
        "bytes-received": 2000,
        "pruning": 0.0,
        "scaling": ALPHA / rank,
    }


def instruction(node: int) -> Message:
    """The train message the server would have sent `node` (Message needs a task identity)."""
    with server_identity(1):
        return Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)


def reply(
    node: int,
    update: Mapping[str, Factors] | None,
    values: Mapping[str, Any] | None,
    *,
    record: type = MetricRecord,
) -> Message:
    """`node`'s reply: its factors as `update` and `values` as its metrics record (either may be
    left out; a ConfigRecord can carry strings and bools, which MetricRecord refuses)."""
    content = RecordDict()
    if update is not None:
        content["update"] = to_record(update)
    if values is not None:
        content["metrics"] = record(dict(values))
    return Message(content, reply_to=instruction(node))


def failure(node: int, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=instruction(node))


def expected_global(
    cfg: RunConfig,
    updates: list[dict[str, Factors]],
    ranks: list[int],
    weights: list[float],
    *,
    server_round: int,
) -> dict[str, torch.Tensor]:
    """The dense per-module global delta the recipe's aggregator makes of these updates, at the
    scaling α/r the server assigns (the aggregator called directly, not through the strategy)."""
    fn = fedllm.aggregators.get(cfg.aggregator.name)
    out = {}
    for module in SHAPES:
        ups = [
            Factors(u[module].B, u[module].A, cfg.client_scaling(r))
            for u, r in zip(updates, ranks, strict=True)
        ]
        out[module] = fn(ups, weights, seed=cfg.seed + server_round).global_.delta()
    return out


def fedit_by_hand(
    updates: list[dict[str, Factors]], weights: list[float], scaling: float
) -> dict[str, torch.Tensor]:
    """FedIT's dense delta for equal-rank updates: (Σ pᵢ s Bᵢ)(Σ pᵢ Aᵢ)."""
    p = [w / sum(weights) for w in weights]
    out = {}
    for module in SHAPES:
        B = sum(pi * scaling * u[module].B.double() for pi, u in zip(p, updates, strict=True))
        A = sum(pi * u[module].A.double() for pi, u in zip(p, updates, strict=True))
        out[module] = B @ A
    return out


def deltas(global_: Mapping[str, Factors]) -> dict[str, torch.Tensor]:
    return {m: f.delta() for m, f in global_.items()}


def assert_deltas_close(got: Mapping[str, Factors], want: Mapping[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for m, delta in want.items():
        torch.testing.assert_close(got[m].delta(), delta, rtol=1e-5, atol=1e-6)


def by_node(result: RoundResult) -> dict[int, ClientRow]:
    rows = {r.node: r for r in result.rows}
    assert len(rows) == len(result.rows), "one row per node"
    return rows


# -- (a) malformed metrics ------------------------------------------------------------------------

GOOD = {1: factors(1), 2: factors(2)}


def _drop(key: str) -> dict:
    m = metrics(3)
    del m[key]
    return m


MALFORMED = {
    "missing steps": (MetricRecord, _drop("steps"), "steps"),
    "missing rank": (MetricRecord, _drop("rank"), "rank"),
    "missing num-examples": (MetricRecord, _drop("num-examples"), "num-examples"),
    "non-numeric rank": (ConfigRecord, {**metrics(3), "rank": "two"}, "rank"),
    "NaN loss": (MetricRecord, {**metrics(3), "train-loss": math.nan}, "train-loss"),
    "infinite first loss": (
        MetricRecord,
        {**metrics(3), "train-loss-first": math.inf},
        "train-loss-first",
    ),
    "bool steps": (ConfigRecord, {**metrics(3), "steps": True}, "steps"),
    "bool rank": (ConfigRecord, {**metrics(3), "rank": True}, "rank"),
    "fractional rank": (MetricRecord, {**metrics(3), "rank": 2.5}, "rank"),
    "negative examples": (MetricRecord, {**metrics(3), "num-examples": -4}, "num-examples"),
    "zero rank": (MetricRecord, {**metrics(3), "rank": 0}, "rank"),
}


def _round_with(cfg: RunConfig, bad: Message, s: LoraStrategy | None = None) -> RoundResult:
    s = s or strategy(cfg)
    replies = [reply(1, GOOD[1], metrics(0)), bad, reply(2, GOOD[2], metrics(1, examples=30))]
    return s.train_round(1, replies, sampled=3)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_metrics_are_rejected_by_key_and_the_rest_aggregate(case: str) -> None:
    record, values, key = MALFORMED[case]
    cfg = recipe()
    s = strategy(cfg)
    result = _round_with(cfg, reply(3, factors(3), values, record=record), s)
    rows = by_node(result)
    assert rows[3].status == "rejected"
    assert rows[3].reason.startswith("malformed reply: ")
    assert f"'{key}'" in rows[3].reason
    assert rows[3].reply is None and rows[3].partition is None
    assert rows[1].status == rows[2].status == "ok"
    assert (result.sampled, result.replies, len(result.ok)) == (3, 3, 2)
    # the global is the aggregate of the two good replies only, weighted 10 : 30
    assert_deltas_close(s.global_, fedit_by_hand([GOOD[1], GOOD[2]], [10, 30], ALPHA / 2))
    assert_deltas_close(
        s.global_, expected_global(cfg, [GOOD[1], GOOD[2]], [2, 2], [10, 30], server_round=1)
    )
    assert result.train_loss == pytest.approx(1.0)
    # a rejected node teaches the server nothing
    assert 3 not in s.node_ranks and 3 not in s.node_partitions


def test_nan_rank_is_rejected_naming_the_key() -> None:
    result = _round_with(recipe(), reply(3, factors(3), {**metrics(3), "rank": math.nan}))
    assert "'rank'" in by_node(result)[3].reason


@pytest.mark.parametrize("key", ["steps", "rank", "num-examples"])
def test_infinite_integer_metric_is_rejected_not_fatal(key: str) -> None:
    # through Flower's protobuf, as a real reply arrives: inf survives it
    result = _round_with(recipe(), wire(reply(3, factors(3), {**metrics(3), key: math.inf})))
    assert by_node(result)[3].status == "rejected"
    assert len(result.ok) == 2


@pytest.mark.parametrize(
    ("update", "values", "reason"),
    [
        (None, metrics(3), "'update'"),  # no factors at all
        (factors(3), None, "'metrics'"),  # no metrics record
    ],
    ids=["no update", "no metrics"],
)
def test_reply_without_a_record_is_rejected(update, values, reason: str) -> None:
    result = _round_with(recipe(), reply(3, update, values))
    row = by_node(result)[3]
    assert row.status == "rejected" and reason in row.reason
    assert len(result.ok) == 2


def test_update_with_a_stray_array_is_rejected() -> None:
    content = RecordDict(
        {
            "update": ArrayRecord(
                {**to_record(factors(3)).to_torch_state_dict(), "x": torch.ones(2)}
            ),
            "metrics": MetricRecord(metrics(3)),
        }
    )
    result = _round_with(recipe(), Message(content, reply_to=instruction(3)))
    row = by_node(result)[3]
    assert row.status == "rejected" and "unexpected array 'x'" in row.reason


# -- (b) the claimed rank must be the factors' rank -----------------------------------------------


@pytest.mark.parametrize(
    ("claimed", "update"),
    [
        (2, factors(3, rank=3)),  # more than claimed (and above the recipe's max rank)
        (1, factors(3, rank=2)),  # fewer than claimed
        (2, {"q": factors(3)["q"], "v": factors(3, rank=1)["v"]}),  # one module off
    ],
    ids=["claims 2 sends 3", "claims 1 sends 2", "mixed ranks"],
)
def test_rank_claim_that_does_not_match_the_factors_is_rejected(claimed, update) -> None:
    cfg = recipe(lora={"ranks": [1, 2]})
    s = strategy(cfg)
    result = _round_with(cfg, reply(3, update, metrics(3, rank=claimed)), s)
    row = by_node(result)[3]
    assert row.status == "rejected"
    assert row.reason == (f"malformed reply: claims rank {claimed} but sent factors of other ranks")
    assert len(result.ok) == 2
    assert_deltas_close(s.global_, fedit_by_hand([GOOD[1], GOOD[2]], [10, 30], ALPHA / 2))
    assert 3 not in s.node_ranks


def test_rank_above_the_recipe_maximum_is_rejected_by_screening() -> None:
    # an honest claim (factors really rank 3) but the recipe's largest rank is 2
    cfg = recipe()
    s = strategy(cfg)
    result = _round_with(cfg, reply(3, factors(3, rank=3), metrics(3, rank=3)), s)
    row = by_node(result)[3]
    assert row.status == "rejected"
    assert row.reason == "q: rank 3 above the allowed 2"
    assert row.partition == 3 and row.reply is not None and row.reply.rank == 3


def test_a_reply_rejected_by_screening_does_not_change_the_nodes_download() -> None:
    cfg = recipe()
    s = strategy(cfg)
    _round_with(cfg, reply(3, factors(3, rank=3), metrics(3, rank=3)), s)
    record, _ = s.download(3)
    assert {t.shape[0] for k, t in record.to_torch_state_dict().items() if "lora_A" in k} == {2}


def test_a_partition_outside_the_recipe_is_rejected() -> None:
    result = _round_with(recipe(), reply(3, factors(3), metrics(99)))
    assert by_node(result)[3].status == "rejected"


# -- (c) norm outliers ----------------------------------------------------------------------------


def test_norm_outlier_is_rejected_and_the_global_is_the_aggregate_of_the_others() -> None:
    cfg = recipe()
    s = strategy(cfg)
    honest = {n: factors(n) for n in (1, 2, 3)}
    examples = {1: 10, 2: 20, 3: 30}
    replies = [reply(n, honest[n], metrics(n - 1, examples=examples[n])) for n in honest]
    replies.insert(1, reply(9, factors(9, scale=1000.0), metrics(3, examples=40)))
    result = s.train_round(4, replies, sampled=4)
    rows = by_node(result)
    assert rows[9].status == "rejected"
    assert " is over 100× the median " in rows[9].reason
    assert rows[9].reason.startswith("update norm ")
    assert rows[9].partition == 3
    assert [rows[n].status for n in honest] == ["ok"] * 3
    assert_deltas_close(s.global_, fedit_by_hand(list(honest.values()), [10, 20, 30], ALPHA / 2))
    assert_deltas_close(
        s.global_,
        expected_global(cfg, list(honest.values()), [2, 2, 2], [10, 20, 30], server_round=4),
    )
    # the train loss is over the accepted clients only (all report 1.0)
    assert result.train_loss == pytest.approx(1.0)


def test_norm_ratio_follows_the_recipe() -> None:
    # scaled 50×: kept under the default 100×, rejected under federation.max_rejected_norm_ratio=10
    def run(cfg: RunConfig) -> ClientRow:
        replies = [reply(n, factors(n), metrics(n - 1)) for n in (1, 2, 3)]
        replies.append(reply(9, factors(9, scale=50.0), metrics(3)))
        return by_node(strategy(cfg).train_round(1, replies, sampled=4))[9]

    assert run(recipe()).status == "ok"
    row = run(recipe(federation={"max_rejected_norm_ratio": 10}))
    assert row.status == "rejected" and "over 10× the median" in row.reason
    # null turns the norm screen off (∞ is not a recipe number): 5000× the median is kept
    replies = [reply(n, factors(n), metrics(n - 1)) for n in (1, 2, 3)]
    replies.append(reply(9, factors(9, scale=5000.0), metrics(3)))
    off = strategy(recipe(federation={"max_rejected_norm_ratio": None}))
    assert by_node(off.train_round(1, replies, sampled=4))[9].status == "ok"


def test_with_two_clients_there_is_no_median_to_reject_against() -> None:
    cfg = recipe()
    s = strategy(cfg)
    big = factors(9, scale=1000.0)
    result = s.train_round(1, [reply(1, GOOD[1], metrics(0)), reply(9, big, metrics(1))], sampled=2)
    assert [r.status for r in result.rows] == ["ok", "ok"]
    assert_deltas_close(s.global_, fedit_by_hand([GOOD[1], big], [10, 10], ALPHA / 2))


# -- (d) every client failed ----------------------------------------------------------------------


def test_every_client_failed_leaves_the_global_unchanged() -> None:
    cfg = recipe()
    s = strategy(cfg)
    before = deltas(s.global_)
    factors_before = {m: (f.B.clone(), f.A.clone(), f.scaling) for m, f in s.global_.items()}
    replies = [failure(n, f"node {n}: out of memory") for n in (1, 2, 3)]
    result = s.train_round(2, replies, sampled=4)
    assert isinstance(result, RoundResult)
    assert (result.sampled, result.replies, result.train_loss, result.ok) == (4, 3, None, [])
    assert [(r.node, r.status, r.reason) for r in result.rows] == [
        (n, "failed", f"node {n}: out of memory") for n in (1, 2, 3)
    ]
    assert all(r.reply is None and r.partition is None for r in result.rows)
    for m, (B, A, scaling) in factors_before.items():
        assert torch.equal(s.global_[m].B, B) and torch.equal(s.global_[m].A, A)
        assert s.global_[m].scaling == scaling
    assert_deltas_close(s.global_, before)
    assert s.agg_state == {} and s.node_ranks == {} and s.client_updates == {}
    # Flower's entry point reports nothing to keep
    assert s.aggregate_train(2, replies) == (None, None)


def test_failed_and_rejected_only_is_a_round_without_an_update() -> None:
    cfg = recipe()
    s = strategy(cfg)
    before = deltas(s.global_)
    replies = [failure(1, "boom"), reply(2, factors(2), _drop("steps"))]
    result = s.train_round(1, replies, sampled=2)
    assert [r.status for r in result.rows] == ["failed", "rejected"]
    assert result.train_loss is None
    assert_deltas_close(s.global_, before)


def test_failed_clients_beside_good_ones() -> None:
    cfg = recipe()
    s = strategy(cfg)
    replies = [failure(5, "timeout"), reply(1, GOOD[1], metrics(0)), failure(6, "killed")]
    result = s.train_round(1, replies, sampled=3)
    assert {r.node: r.status for r in result.rows} == {5: "failed", 1: "ok", 6: "failed"}
    assert_deltas_close(s.global_, fedit_by_hand([GOOD[1]], [10], ALPHA / 2))


def test_a_feature_failing_on_an_accepted_reply_does_not_end_the_round(caplog) -> None:
    """h103: `accepted` (a bandit's reward) ran outside any guard, so whatever a reply made it
    raise ended the server, and every resume reran the round into the same error."""
    from fedllm.features.base import Feature

    class Fails(Feature):
        name = "fails"

        def accepted(self, node: int, reply: TrainReply) -> None:
            raise IndexError("index out of range in self")

    cfg = recipe()
    s = LoraStrategy(cfg, shapes=SHAPES, features=[*registry.build(cfg), Fails(cfg)])
    result = s.train_round(1, [reply(1, GOOD[1], metrics(0))], sampled=1)
    assert [r.status for r in result.rows] == ["ok"]
    assert_deltas_close(s.global_, fedit_by_hand([GOOD[1]], [10], ALPHA / 2))
    assert "features.fails failed on node 1" in caplog.text


def test_ffa_takes_the_global_a_whatever_a_client_sends() -> None:
    """h104: FFA kept a client's zero columns of A (for pruned clients, refused with FFA since
    stop 44), so one zero column made the aggregator raise every round and the run stop after
    three. The server's own A stands in for whatever A a client sends."""
    cfg = recipe(aggregator={"name": "ffa"})
    s = strategy(cfg)
    hostile = {m: Factors(f.B, f.A.clone(), f.scaling) for m, f in factors(3).items()}
    hostile["q"].A[:, 1] = 0.0
    replies = [reply(1, GOOD[1], metrics(0)), reply(3, hostile, metrics(1))]
    result = s.train_round(1, replies, sampled=2)
    assert result.aggregator_error is None
    assert [r.status for r in result.rows] == ["ok", "ok"]
    assert torch.count_nonzero(s.global_["q"].A[:, 1]) > 0, "the shared A, not the zero column"


def test_ffa_keeps_its_frozen_a_through_a_round_without_the_top_rank() -> None:
    """h105: a round of rank-2 clients shrank FFA's global A to 2 rows; next round a rank-4
    client's A was its own (nothing to substitute past row 2) and the aggregator raised, every
    round after, until the run stopped. The server's A₀ keeps its 4 rows."""
    cfg = recipe(lora={"ranks": [2, 4, 2, 4]}, aggregator={"name": "ffa"})
    s = strategy(cfg)
    A0 = {m: f.A.clone() for m, f in s.global_.items()}
    assert all(a.shape[0] == 4 for a in A0.values())
    s.train_round(1, [reply(1, factors(1, rank=2), metrics(0, rank=2))], sampled=1)
    assert all(torch.equal(s.global_[m].A, A0[m]) for m in SHAPES)
    result = s.train_round(2, [reply(2, factors(2, rank=4), metrics(1, rank=4))], sampled=1)
    assert result.aggregator_error is None and [r.status for r in result.rows] == ["ok"]
    assert all(torch.equal(s.global_[m].A, A0[m]) for m in SHAPES)


def test_a_private_run_drops_client_updates_an_older_checkpoint_kept() -> None:
    """h107: `load_state_dict` took `client_updates` whatever the mode, and `client_adapters/`
    is written from them: a checkpoint from before stop 31 would put them back in a private
    run's folder. A private strategy keeps none."""
    plain = strategy(recipe())
    plain.train_round(1, [reply(1, GOOD[1], metrics(0))], sampled=1)
    state = plain.state_dict()
    assert state["client_updates"]
    private = strategy(recipe(privacy={"mode": "sample", "noise_multiplier": 1.0}))
    assert private.private
    private.load_state_dict(state)
    assert private.client_updates == {}


def test_a_private_run_keeps_only_the_reply_keys_its_guarantee_allows() -> None:
    """h107: clients strip their reply to the keys the run's DP covers, but the server read
    whatever came: an outdated client's training loss was saved in a private run's rows. The
    server applies the same filter."""
    private = {"mode": "client", "client_noise_multiplier": 1.0}
    s = strategy(recipe(privacy=private, aggregator={"name": "fedit", "weighting": "uniform"}))
    values = {**metrics(0), "train-loss": 0.123, "train-seconds": 9.0}
    result = s.train_round(1, [reply(1, GOOD[1], values)], sampled=1)
    (row,) = result.rows
    assert row.status == "ok" and row.reply.train_loss is None
    saved = row.to_json()
    assert saved["train_loss"] is None and saved["train_seconds"] is None
    assert 0.123 not in saved.values() and 9.0 not in saved.values()


# -- (e) non-finite factors -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=repr)
@pytest.mark.parametrize("where", ["B", "A"])
def test_non_finite_factors_are_rejected_by_screening(bad: float, where: str) -> None:
    cfg = recipe()
    s = strategy(cfg)
    poisoned = factors(3)
    v = poisoned["v"]
    B, A = v.B.clone(), v.A.clone()
    (B if where == "B" else A)[1, 1] = bad
    poisoned["v"] = Factors(B, A, 1.0)
    result = _round_with(cfg, reply(3, poisoned, metrics(3)), s)
    row = by_node(result)[3]
    assert row.status == "rejected"
    assert row.reason == "v: NaN or Inf in the factors"
    # screened, not malformed: the row keeps the validated reply and its partition
    assert row.reply is not None and row.partition == 3
    assert len(result.ok) == 2
    for f in s.global_.values():
        assert torch.isfinite(f.B).all() and torch.isfinite(f.A).all()
    assert_deltas_close(s.global_, fedit_by_hand([GOOD[1], GOOD[2]], [10, 30], ALPHA / 2))


# -- (f) weighting of the train loss (and of the aggregate) ---------------------------------------


@pytest.mark.parametrize(
    ("weighting", "loss", "weights"),
    [("examples", (10 * 1.0 + 30 * 3.0) / 40, [10, 30]), ("uniform", 2.0, [1, 1])],
)
def test_train_loss_and_aggregate_follow_the_weighting(weighting, loss, weights) -> None:
    cfg = recipe(aggregator={"weighting": weighting})
    s = strategy(cfg)
    replies = [
        reply(1, GOOD[1], metrics(0, examples=10, loss=1.0)),
        reply(2, GOOD[2], metrics(1, examples=30, loss=3.0)),
        # rejected replies' losses never count
        reply(3, factors(3), {**metrics(2, examples=1000, loss=50.0), "steps": 1.5}),
    ]
    result = s.train_round(1, replies, sampled=3)
    assert result.train_loss == pytest.approx(loss)
    assert_deltas_close(s.global_, fedit_by_hand([GOOD[1], GOOD[2]], weights, ALPHA / 2))
    _, summary = strategy(cfg).aggregate_train(1, replies)
    assert summary["train-loss"] == pytest.approx(loss)
    assert (summary["clients"], summary["rejected"], summary["global-rank"]) == (2, 1, 2)


def test_only_zero_example_replies_do_not_abort_the_round() -> None:
    cfg = recipe()
    s = strategy(cfg)
    before = {m: (f.B.clone(), f.A.clone()) for m, f in s.global_.items()}
    replies = [failure(1, "gone"), reply(2, factors(2), metrics(0, examples=0))]
    result = s.train_round(1, replies, sampled=2)
    assert isinstance(result, RoundResult)
    status = {r.node: (r.status, r.reason) for r in result.rows}
    assert status[1][0] == "failed" and status[2][0] == "rejected"
    assert "'num-examples'" in status[2][1]
    assert result.train_loss is None, "no accepted reply, no training loss"
    for m, (B, A) in before.items():  # nothing accepted: the global stays as it was
        assert torch.equal(s.global_[m].B, B) and torch.equal(s.global_[m].A, A)


def test_zero_example_reply_beside_others_is_rejected() -> None:
    cfg = recipe()
    s = strategy(cfg)
    replies = [
        reply(1, GOOD[1], metrics(0, examples=10, loss=2.0)),
        reply(2, GOOD[2], metrics(1, examples=0, loss=9.0)),
    ]
    result = s.train_round(1, replies, sampled=2)
    assert [r.status for r in result.rows] == ["rejected", "ok"]
    assert "'num-examples'" in result.rows[0].reason
    assert result.train_loss == pytest.approx(2.0)
    assert_deltas_close(s.global_, fedit_by_hand([GOOD[1]], [1.0], ALPHA / 2))


# -- (g) the download is cut to the node's known rank ---------------------------------------------


def decoded(record: ArrayRecord) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors = record.to_torch_state_dict()
    assert set(tensors) == {f"{m}.lora_{x}" for m in SHAPES for x in "AB"}
    return {m: (tensors[f"{m}.lora_B"], tensors[f"{m}.lora_A"]) for m in SHAPES}


def test_download_is_full_rank_before_a_reply_and_cut_after() -> None:
    cfg = recipe(lora={"ranks": [2, 4]})  # max rank 4; scalings α/2 = 2 and α/4 = 1
    s = strategy(cfg)
    assert s.max_rank == 4
    # before any reply: the whole initial global (rank 4, B = 0)
    record, extra = s.download(7)
    assert extra == {}
    for m, (B, A) in decoded(record).items():
        assert B.shape == (SHAPES[m][0], 4) and A.shape == (4, SHAPES[m][1])
        assert torch.equal(A, s.global_[m].A) and torch.count_nonzero(B) == 0
    # one round: node 7 trains at rank 2, node 8 at rank 4
    replies = [
        reply(7, factors(7, rank=2), metrics(0, rank=2)),
        reply(8, factors(8, rank=4), metrics(1, rank=4)),
    ]
    result = s.train_round(1, replies, sampled=2)
    assert len(result.ok) == 2
    assert s.node_ranks == {7: 2, 8: 4} and s.node_partitions == {7: 0, 8: 1}
    g = s.global_
    assert {f.rank for f in g.values()} == {4} and s.global_scaling == 1.0  # fedit: scaling 1
    # node 7: the first two components, B rescaled from the global scaling 1 to α/2 = 2, and
    # the config says so: the node reads them at 2 and starts from exactly the global's cut
    record, extra = s.download(7)
    assert extra == {"global-scaling": 2.0}
    for m, (B, A) in decoded(record).items():
        torch.testing.assert_close(B, g[m].B[:, :2] * (1.0 / 2.0))
        torch.testing.assert_close(A, g[m].A[:2])
    config = {**s.round_config(2), **extra}
    for m, f in from_record(record, float(config["global-scaling"])).items():
        start = f.truncate(2, cfg.client_scaling(2))  # what the client writes into its LoRA
        torch.testing.assert_close(start.delta(), g[m].truncate(2).delta())
    # node 8 (rank 4, scaling 1) and an unknown node 9 get the whole global
    for node in (8, 9):
        for m, (B, A) in decoded(s.download(node)[0]).items():
            torch.testing.assert_close(B, g[m].B)
            torch.testing.assert_close(A, g[m].A)


def test_remember_alone_sets_the_download_rank() -> None:
    cfg = recipe(lora={"ranks": [1, 3]})
    s = strategy(cfg)
    full = s.global_
    s.remember(5, TrainReply.parse(metrics(1, rank=1)))
    for m, (B, A) in decoded(s.download(5)[0]).items():
        assert B.shape == (SHAPES[m][0], 1) and A.shape == (1, SHAPES[m][1])
        torch.testing.assert_close(A, full[m].A[:1])
    # the cut is on the way out only: the global keeps its rank
    assert {f.rank for f in s.global_.values()} == {3}


# -- (h) sampling ---------------------------------------------------------------------------------


class Nodes:
    """A Grid for `sample`: only `get_node_ids` is needed."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)

    def send_and_receive(self, messages: object, *, timeout: float | None = None) -> list:
        """No node answers the server's query: each is seated by its id (`seats`)."""
        return []


NODE_IDS = [1004, 1001, 1003, 1002]  # a grid need not list its nodes in order


@pytest.fixture
def identity() -> Iterator[None]:
    """A ServerApp's run id, which the server's query messages need (`LoraStrategy.introduce`)."""
    with server_identity(1):
        yield


def test_sample_is_deterministic_for_seed_and_round(identity) -> None:
    cfg = recipe(federation={"clients_per_round": 2})
    a, b = strategy(cfg), strategy(cfg)
    draws = {}
    for rnd in range(1, 21):
        first = a.sample(rnd, Nodes(NODE_IDS))
        assert first == b.sample(rnd, Nodes(list(reversed(NODE_IDS))))  # a fresh (resumed) server
        assert first == a.sample(rnd, Nodes(NODE_IDS))  # asked again
        assert len(first) == 2 and len(set(first)) == 2
        assert first == sorted(first) and set(first) <= set(NODE_IDS)
        draws[rnd] = tuple(first)
    assert len(set(draws.values())) > 1, "rounds draw different subsets"


def test_sample_depends_on_the_seed(identity) -> None:
    def draws(seed: int) -> list[tuple[int, ...]]:
        cfg = build_config(
            {
                "seed": seed,
                "data": {"num_clients": 4},
                "lora": {"ranks": 2, "alpha": ALPHA},
                "federation": {"clients_per_round": 2},
            }
        )
        s = LoraStrategy(cfg, shapes=SHAPES)
        return [tuple(s.sample(r, Nodes(NODE_IDS))) for r in range(1, 11)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


@pytest.mark.parametrize(
    ("per_round", "nodes", "expected"),
    [(None, NODE_IDS, 4), (1, NODE_IDS, 1), (3, NODE_IDS, 3), (4, NODE_IDS, 4), (3, [7, 8], 2)],
)
def test_sample_size_respects_clients_per_round(per_round, nodes, expected, identity) -> None:
    s = strategy(recipe(federation={"clients_per_round": per_round}))
    for rnd in (1, 2, 3):
        picked = s.sample(rnd, Nodes(nodes))
        assert len(picked) == expected and set(picked) <= set(nodes)
        if expected == len(nodes):
            assert picked == sorted(nodes)


def test_clients_per_round_above_num_clients_is_refused_by_the_recipe() -> None:
    with pytest.raises(ValueError, match=r"clients_per_round \(5\) exceeds data.num_clients"):
        recipe(federation={"clients_per_round": 5})


# -- (i) the metrics.jsonl rows -------------------------------------------------------------------

OK_KEYS = {
    "kind",
    "round",
    "node",
    "status",
    "partition",
    "rank",
    "num_examples",
    "train_loss",
    "train_loss_first",
    "train_loss_last",
    "steps",
    "train_seconds",
    "bytes_sent",
    "bytes_received",
    "pruning",
}
OTHER_KEYS = {"kind", "round", "node", "status", "reason"}


def test_client_rows_to_json_have_the_keys_metrics_consumers_read() -> None:
    cfg = recipe()
    s = strategy(cfg)
    replies = [
        reply(1, GOOD[1], metrics(0, examples=12, loss=0.75)),
        reply(2, GOOD[2], metrics(1)),
        reply(3, factors(3), {**metrics(2), "train-loss": math.nan}),  # malformed
        reply(
            4,
            {**factors(4), "v": Factors(torch.full((4, 2), math.nan), torch.ones(2, 4), 1.0)},
            metrics(3),
        ),  # screened out
        failure(5, "out of memory"),
    ]
    rows = {r.node: r.to_json() for r in s.train_round(6, replies, sampled=5).rows}
    assert set(rows) == {1, 2, 3, 4, 5}
    for row in rows.values():
        json.dumps(row, allow_nan=False)  # plain JSON values only
        assert row["kind"] == "client" and row["round"] == 6
    assert set(rows[1]) == set(rows[2]) == OK_KEYS
    assert OK_KEYS | OTHER_KEYS <= ROW_KEYS  # no feature's declared metric may take one of them
    assert rows[1] == {
        "kind": "client",
        "round": 6,
        "node": 1,
        "status": "ok",
        "partition": 0,
        "rank": 2,
        "num_examples": 12,
        "train_loss": 0.75,
        "train_loss_first": 1.75,
        "train_loss_last": 0.25,
        "steps": 5,
        "train_seconds": 0.25,
        "bytes_sent": 1000,
        "bytes_received": 2000,
        "pruning": 0.0,
    }
    # malformed: nothing was validated, so nothing but the reason
    assert set(rows[3]) == OTHER_KEYS and rows[3]["status"] == "rejected"
    assert "'train-loss'" in rows[3]["reason"]
    # screened out: the validated partition is kept beside the reason
    assert set(rows[4]) == OTHER_KEYS | {"partition"}
    assert (rows[4]["status"], rows[4]["partition"]) == ("rejected", 3)
    assert rows[4]["reason"] == "v: NaN or Inf in the factors"
    assert rows[5] == {
        "kind": "client",
        "round": 6,
        "node": 5,
        "status": "failed",
        "reason": "out of memory",
    }


def test_client_row_fields_are_added_to_every_status() -> None:
    reply_ = TrainReply.parse(metrics(2))
    rows = [
        ClientRow(1, 7, "ok", reply_, 2, fields={"epsilon": 1.5}),
        ClientRow(1, 7, "rejected", reply_, 2, "too big", fields={"epsilon": 1.5}),
        ClientRow(1, 7, "failed", reason="gone", fields={"epsilon": 1.5}),
    ]
    for row, keys in zip(rows, [OK_KEYS, OTHER_KEYS | {"partition"}, OTHER_KEYS], strict=True):
        out = row.to_json()
        assert set(out) == keys | {"epsilon"} and out["epsilon"] == 1.5


# -- a resumed strategy: node ids may be new, the server's view of clients is kept ----------------


def test_a_resumed_strategy_counts_new_node_ids_as_any_partition_not_held_here(
    tmp_path: Path,
) -> None:
    """A resumed simulation gives its nodes new ids: the checkpoint's node -> partition map
    must not make them hold nothing (a DP budget check and a lost round's charge read it)."""
    from fedllm.server.checkpoint import load_checkpoint, save_checkpoint

    cfg = recipe()
    first = strategy(cfg)
    first.train_round(1, [reply(1 + p, factors(p), metrics(p)) for p in range(4)], sampled=4)
    assert first.may_train([99]) == []  # every partition is held by a node of this process
    save_checkpoint(tmp_path, {"strategy": first.state_dict()})
    resumed = strategy(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path)["strategy"])
    assert resumed.may_train([101]) == [0, 1, 2, 3]
    assert resumed.may_train([1]) == [0]  # a node the checkpoint knows (a deployment's)
    resumed.train_round(2, [reply(102, factors(2), metrics(2))], sampled=1)
    assert resumed.may_train([101]) == [0, 1, 3]
    # the server's view of every client survives too (client_adapters/ at the end)
    assert sorted(resumed.client_updates) == [0, 1, 2, 3]
    assert resumed.client_updates[0][0] == 1 and resumed.client_updates[2][0] == 2
    for m, f in first.client_updates[1][1].items():
        assert torch.equal(resumed.client_updates[1][1][m].B, f.B)
